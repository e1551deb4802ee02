#!/usr/bin/env bash
# Build llama.cpp with CUDA (sm_90: the H100/H200 GPU machine) here, on a machine without a
# GPU, into .carry/llama-cuda-prebuilt.tar.xz, which tests/bench/gpu_table.sh uses instead of
# building on the GPU machine: that saves ~5 of the 15 minutes a session has there.
#
#   bash tests/bench/gpu_prebuild.sh [WORK_DIR]      (in the project's root; ~20 min on 2 cores)
#
# Needs CUDA's compiler here (nvcc 13, as on the GPU machine) and pip access: cuBLAS comes from
# the nvidia-cublas wheel (linked against, not carried: the GPU machine has its own). The
# driver library, libcuda.so.1, is a stub with the symbols ggml-cuda uses, so that the link
# records it; the GPU machine's driver provides the real one. The sources are llama.cpp as
# vendored by the installed llama-cpp-python (as ../shared/bench/build-llama-server.sh takes
# them), so llama-server and the engine run the same commit. The tarball: bin/ (llama-server,
# llama-batched-bench), lib/ (libllama, libggml-*), python/llama_cpp (the bindings). It also
# writes .carry/llama-tools-ui.tar.xz, which gpu_table.sh's fallback build needs.
set -euo pipefail
root=$(pwd)
work=${1:-/tmp/homefleet-cuda-build}
py=${PYTHON:-$root/.venv/bin/python}
cuda=${CUDA_HOME:-/usr/local/cuda}
mkdir -p "$work" "$root/.carry"
grep -qxF '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude

# llama.cpp's sources, the installed bindings' commit
version=$("$py" -c 'import llama_cpp; print(llama_cpp.__version__)')
src=$work/llama_cpp_python-$version/vendor/llama.cpp
if [ ! -d "$src" ]; then
  "$py" -m pip download -q --no-deps --no-binary :all: -d "$work/sdist" "llama-cpp-python==$version"
  tar xzf "$work/sdist/llama_cpp_python-$version.tar.gz" -C "$work"
fi

# a toolkit of links: CUDA's, plus cuBLAS from its wheel and a stub libcuda
tk=$work/toolkit
if [ ! -e "$tk/lib/libcublas.so" ]; then
  rm -rf "$tk" && cp -as "$(readlink -f "$cuda")" "$tk"
  # lib and include as folders of links of our own: what is added there must not land in CUDA's
  for d in lib include; do
    real=$(readlink -f "$cuda/$([ $d = lib ] && echo lib64 || echo include)")
    rm -rf "${tk:?}/$d" && mkdir "$tk/$d" && for f in "$real"/*; do ln -s "$f" "$tk/$d/"; done
  done
  rm -f "$tk/lib64" && ln -s lib "$tk/lib64"
  "$py" -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --python-version 3.12 -d "$work/wheels" \
    "nvidia-cublas>=13,<14"
  (cd "$work" && rm -rf cublas && mkdir cublas && cd cublas && unzip -q "$work"/wheels/nvidia_cublas-*.whl)
  blas=$(ls -d "$work"/cublas/nvidia/cu*)
  for f in "$blas"/lib/*; do ln -sf "$f" "$tk/lib/"; done
  for f in "$blas"/include/*; do ln -sf "$f" "$tk/include/"; done
  ln -sf "$blas/lib/libcublas.so.13" "$tk/lib/libcublas.so"
  ln -sf "$blas/lib/libcublasLt.so.13" "$tk/lib/libcublasLt.so"
fi
stub() {  # a libcuda.so.1 that defines the driver functions libggml-cuda calls
  [ ! -L "$tk/lib/stubs" ] || { echo "CUDA's own lib/stubs has no usable libcuda.so" >&2; exit 1; }
  mkdir -p "$tk/lib/stubs"
  { echo "void homefleet_cuda_stub(void) {}"
    [ -f "$1" ] && nm -D --undefined-only "$1" | awk '$2 ~ /^cu[A-Z]/ {print "int " $2 "(void) { return 0; }"}'
  } > "$tk/lib/stubs/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$tk/lib/stubs/libcuda.so" "$tk/lib/stubs/stub.c"
}

build=$work/build
cuda_lib=$build/bin/libggml-cuda.so
[ -f "$tk/lib/stubs/libcuda.so" ] || stub none
cmake -S "$src" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=on -DGGML_RPC=on \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DGGML_NATIVE=off -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DCUDAToolkit_ROOT="$tk" \
  -DCMAKE_CUDA_COMPILER="$tk/bin/nvcc" -DCMAKE_CUDA_FLAGS="-I$tk/include" -DCMAKE_CXX_FLAGS="-I$tk/include" \
  -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined '-DCMAKE_BUILD_RPATH=$ORIGIN' > "$work/cmake.log"
targets=(llama-server llama-batched-bench)
cmake --build "$build" --target "${targets[@]}" -j"$(nproc)" > "$work/build.log"
if ! readelf -d "$cuda_lib" | grep -q "libcuda.so.1"; then
  # the first link dropped the empty stub (nothing resolved from it): stub the functions, link again
  stub "$cuda_lib" && rm -f "$build"/bin/libggml-cuda.so*
  cmake --build "$build" --target "${targets[@]}" -j"$(nproc)" >> "$work/build.log"
fi
readelf -d "$cuda_lib" | grep -q "libcuda.so.1" || { echo "libggml-cuda does not record libcuda.so.1" >&2; exit 1; }

stage=$work/stage
rm -rf "$stage" && mkdir -p "$stage/bin" "$stage/lib" "$stage/python"
cp -a "$build"/bin/lib*.so* "$stage/lib/" && cp "$build"/bin/llama-{server,batched-bench} "$stage/bin/"
cp -a "$("$py" -c 'import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))')" "$stage/python/"
rm -rf "$stage/python/llama_cpp/lib" && find "$stage/python" -name __pycache__ -prune -exec rm -rf {} +
strip --strip-unneeded "$stage"/lib/*.so.* "$stage"/lib/libllama-*impl.so "$stage"/bin/*
tar cf - -C "$stage" bin lib python | xz -9 -T"$(nproc)" > "$root/.carry/llama-cuda-prebuilt.tar.xz"
# for gpu_table.sh's fallback build: the server's web UI sources, which prepare.sh's trimmed tree lacks
tar cJf "$root/.carry/llama-tools-ui.tar.xz" -C "$src/tools" ui
ls -la "$root/.carry/llama-cuda-prebuilt.tar.xz"
