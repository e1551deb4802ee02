#!/usr/bin/env bash
# Issue 10's table on an NVIDIA GPU machine (../shared/gpu/README.md): homefleet's batched
# engine (worker/batch_engine.py, the replica's engine, in a process of its own) and today's
# one-request-at-a-time path against `llama-server -np 8` of the same llama.cpp commit, every
# layer on GPU 0, at 1, 4 and 8 streams (tests/bench/batch_bench.py --gpu-layers 999).
# The models have the shapes of real 1-3B models and random weights (tests/gguf_factory.py
# SHAPES): such a machine cannot download weights, and tokens/s depends on the shape only.
# Ray's wheel is over what one device call carries, so `homefleet up` itself does not run there.
#
# On the GPU machine, in the project's root, after ../shared/gpu/prepare.sh filled .carry/:
#   bash tests/bench/gpu_table.sh OUT_DIR [SHAPE...]        (default: llama3.2-1b llama3.2-3b)
# llama.cpp with CUDA comes from .carry/llama-cuda-prebuilt.tar.xz where that holds a build
# that runs here (bin/, lib/ and the llama_cpp package), else it is built here from .carry's
# sources and llama-tools-ui.tar.xz (both from gpu_prebuild.sh; about 5 minutes on 16 cores). Results: OUT_DIR/SHAPE.json (batch_bench's JSON),
# SHAPE.log and SHAPE-batched-bench.txt (llama.cpp's own llama-batched-bench, the ceiling),
# progress.txt (steps, times, the GPU).
set -euo pipefail
out=${1:?usage: gpu_table.sh OUT_DIR [SHAPE...]}
shift
if [ $# -gt 0 ]; then shapes=("$@"); else shapes=(llama3.2-1b llama3.2-3b); fi
root=$(pwd)
llc=/tmp/llama-cuda
site=/tmp/site
mkdir -p "$out" "$llc" "$site"
say() { echo "[$(date +%T)] $*" | tee -a "$out/progress.txt"; }

python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$root"/.carry/wheels/diskcache-*.whl \
  "$root"/.carry/wheels/gguf-*.whl
# cuBLAS and the CUDA runtime: the toolkit's, else the pip packages' (PyTorch's)
cuda_libs=$(python3 - <<'EOF'
import glob, os
dirs = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
try:
    import nvidia
    dirs += [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))]
except ImportError:
    pass
print(":".join(d for d in dirs if glob.glob(os.path.join(d, "libcublas.so*")) or glob.glob(os.path.join(d, "libcudart.so*"))))
EOF
)
export LD_LIBRARY_PATH="$llc/lib:$cuda_libs:${LD_LIBRARY_PATH:-}" LLAMA_CPP_LIB_PATH="$llc/lib"
export PYTHONPATH="$site:$llc/python:$root" PYTHONUNBUFFERED=1
gpu_ok() {  # llama-server sees the GPU, and llama_cpp loads the same libraries
  "$llc/bin/llama-server" --list-devices 2>&1 | tee -a "$out/progress.txt" | grep -q "CUDA0" &&
    (cd / && python3 -c "import sys, llama_cpp; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)")
}

if [ -f "$root/.carry/llama-cuda-prebuilt.tar.xz" ]; then
  tar xJf "$root/.carry/llama-cuda-prebuilt.tar.xz" -C "$llc"
fi
if gpu_ok 2>>"$out/progress.txt"; then
  say "llama.cpp (CUDA): the prebuilt one"
else
  say "llama.cpp (CUDA): building here"
  src=$(mktemp -d)
  tar xJf "$root"/.carry/llama_cpp_python-*-gpu-src.tar.xz -C "$src"
  v=$(ls -d "$src"/llama_cpp_python-*)/vendor/llama.cpp
  [ -d "$v/tools/ui" ] || tar xJf "$root/.carry/llama-tools-ui.tar.xz" -C "$v/tools"
  cmake -S "$v" -B "$src/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=on -DGGML_RPC=on \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_NATIVE=off -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF > "$out/build.log" 2>&1
  cmake --build "$src/build" --target llama-server llama-batched-bench -j"$(nproc)" >> "$out/build.log" 2>&1
  rm -rf "$llc"/* && mkdir -p "$llc/bin" "$llc/lib" "$llc/python"
  cp -a "$src"/build/bin/lib*.so* "$llc/lib/" && cp "$src"/build/bin/llama-{server,batched-bench} "$llc/bin/"
  cp -a "$(dirname "$v")/../llama_cpp" "$llc/python/"
  gpu_ok
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$out/progress.txt"

for shape in "${shapes[@]}"; do
  model=/tmp/$shape-q4_k_m.gguf
  say "$shape: writing $model"
  python3 -m tests.gguf_factory --shape "$shape" --quant Q4_K_M "$model" >> "$out/$shape.log" 2>&1
  say "$shape: llama-batched-bench"
  "$llc/bin/llama-batched-bench" -m "$model" -c 16384 -b 2048 -ub 512 -npp 128 -ntg 256 -npl 1,4,8 -ngl 999 \
    > "$out/$shape-batched-bench.txt" 2>&1 || say "$shape: llama-batched-bench failed"
  say "$shape: batch_bench"
  # 8192 a slot: a random model's answers, tokenised again, take the 10-turn chat to ~4.5k tokens
  python3 -m tests.bench.batch_bench --model "$model" --gpu-layers 999 --engines llama_server,batched,today \
    --server "$llc/bin/llama-server" --streams 1,4,8 --repeats "${REPEATS:-5}" --max-tokens 256 \
    --ctx-per-slot 8192 > "$out/$shape.json" 2>> "$out/$shape.log" || say "$shape: batch_bench failed"
  rm -f "$model"
  tail -n 5 "$out/$shape-batched-bench.txt"
  tail -n 14 "$out/$shape.log"
done
say done
