"""A helper node's llama.cpp RPC server, as a child process of its agent (issue 13):

    python -m worker.rpc_server --endpoint 192.168.1.21:50052 [--gpu 0] [--threads N]

It serves one device (the GPU placement chose, else the CPU) to the replica of a model split
across machines, until the agent stops it when the split ends. llama.cpp's RPC protocol has
no authentication: it binds to the node's cluster address only (deploy/README.md says what
that means on a LAN).
"""

from __future__ import annotations

import argparse
import os
import sys

from worker import ggml_rpc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.rpc_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", required=True, help="HOST:PORT to listen on (the node's cluster address)")
    parser.add_argument("--gpu", type=int, default=None, help="the GPU to serve (CUDA/NVML index); the CPU if none")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (CPU device only)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the agent) dies, so that no server is left listening unused")
    args = parser.parse_args(argv)
    if args.parent_pid is not None and not _die_with_parent(args.parent_pid):
        return 1
    # The GPU number is placement's (NVML's, in PCI bus order); CUDA's own order is fastest first.
    os.environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    if not ggml_rpc.supported():
        print("this llama.cpp has no RPC backend (build llama-cpp-python with CMAKE_ARGS=-DGGML_RPC=on)",
              file=sys.stderr)
        return 2
    device = ggml_rpc.served_device(args.gpu)
    name, _, description = ggml_rpc.local_devices()[device]
    print(f"serving {name} ({description}) at {args.endpoint}", file=sys.stderr, flush=True)
    ggml_rpc.start_server(args.endpoint, device, args.threads or max(1, (os.cpu_count() or 2) // 2))
    return 1  # it returns only when it could not serve (llama.cpp has said why)


def _die_with_parent(parent_pid: int) -> bool:
    """Linux's PR_SET_PDEATHSIG: SIGTERM when the parent dies; False if it is gone already."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the agent stops its servers itself
    return os.getppid() == parent_pid


if __name__ == "__main__":
    sys.exit(main())
