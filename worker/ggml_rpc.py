"""llama.cpp's RPC backend through ggml's C API (ctypes): llama-cpp-python binds llama.h only.

Two uses (issue 13): a helper node serves its device to another machine's replica
(`start_server`, in a child process: it never returns), and a split replica adds those
servers' devices to the ones its model loads onto (`rpc_devices`). Both need llama.cpp built
with `GGML_RPC=on` (README); `supported()` says whether this build has it.
"""

from __future__ import annotations

import ctypes
import socket
from functools import cache
from pathlib import Path

DEVICE_TYPE_CPU, DEVICE_TYPE_GPU = 0, 1  # enum ggml_backend_dev_type


def supported() -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_supports_rpc())


@cache
def _ggml() -> ctypes.CDLL:
    import llama_cpp  # loads libllama and, with it, the ggml libraries from the same folder

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml.so"))
    p, i, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    for name, restype, argtypes in [
        ("ggml_backend_reg_by_name", p, [ctypes.c_char_p]),
        ("ggml_backend_reg_get_proc_address", p, [p, ctypes.c_char_p]),
        ("ggml_backend_reg_dev_count", s, [p]),
        ("ggml_backend_reg_dev_get", p, [p, s]),
        ("ggml_backend_dev_count", s, []),
        ("ggml_backend_dev_get", p, [s]),
        ("ggml_backend_dev_type", i, [p]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [p]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [p]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _rpc_function(name: str, restype, argtypes):
    lib = _ggml()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    if not reg:
        raise RuntimeError("this llama.cpp has no RPC backend: install llama-cpp-python built with "
                           "CMAKE_ARGS=\"-DGGML_RPC=on\" (README)")
    address = lib.ggml_backend_reg_get_proc_address(reg, name.encode())
    if not address:
        raise RuntimeError(f"llama.cpp's RPC backend has no {name}")
    return ctypes.CFUNCTYPE(restype, *argtypes)(address)


def local_devices() -> list[tuple[str, int, str]]:
    """(name, type, description) of each device ggml has here, in its order."""
    lib = _ggml()
    out = []
    for index in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(index)
        out.append((lib.ggml_backend_dev_name(dev).decode(), lib.ggml_backend_dev_type(dev),
                    (lib.ggml_backend_dev_description(dev) or b"").decode()))
    return out


def served_device(gpu_index: int | None) -> int:
    """ggml's index of the device a helper node serves: the GPU placement chose (the
    `gpu_index`-th GPU, in ggml's order), else the CPU (a node without a GPU, or tests)."""
    devices = local_devices()
    gpus = [i for i, (_, kind, _) in enumerate(devices) if kind == DEVICE_TYPE_GPU]
    if gpu_index is not None and gpu_index < len(gpus):
        return gpus[gpu_index]
    cpus = [i for i, (_, kind, _) in enumerate(devices) if kind == DEVICE_TYPE_CPU]
    if not cpus:
        raise RuntimeError(f"no device to serve among {devices}")
    return cpus[0]


def start_server(endpoint: str, device_index: int, n_threads: int) -> None:
    """Serve one local device at `endpoint` (HOST:PORT); blocks for good (run it in a child
    process, which the agent stops). llama.cpp's RPC has no authentication: bind to the
    node's cluster address only."""
    lib = _ggml()
    start = _rpc_function("ggml_backend_rpc_start_server", None,
                          [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_size_t,
                           ctypes.POINTER(ctypes.c_void_p)])
    devices = (ctypes.c_void_p * 1)(lib.ggml_backend_dev_get(device_index))
    start(endpoint.encode(), None, n_threads, 1, devices)


def rpc_devices(endpoints: list[str], connect_timeout_s: float = 5.0) -> list[int]:
    """The devices (ggml_backend_dev_t, as ints) that the RPC servers at `endpoints` serve,
    in that order, for llama_model_params.devices. A server that does not answer is a
    RuntimeError here: llama.cpp itself aborts the process on a failed connect."""
    lib = _ggml()
    add_server = _rpc_function("ggml_backend_rpc_add_server", ctypes.c_void_p, [ctypes.c_char_p])
    out = []
    for endpoint in endpoints:
        host, _, port = endpoint.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=connect_timeout_s).close()
        except (OSError, ValueError) as exc:
            raise RuntimeError(f"llama.cpp's RPC server at {endpoint} does not answer: {exc}") from None
        reg = add_server(endpoint.encode())
        if not reg:
            raise RuntimeError(f"cannot reach llama.cpp's RPC server at {endpoint}")
        out += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return out


def local_gpu_device(gpu_index: int) -> int | None:
    """This process's `gpu_index`-th GPU as a ggml device (None where it has none)."""
    lib = _ggml()
    gpus = [i for i, (_, kind, _) in enumerate(local_devices()) if kind == DEVICE_TYPE_GPU]
    return lib.ggml_backend_dev_get(gpus[gpu_index]) if gpu_index < len(gpus) else None
