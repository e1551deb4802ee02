"""llama.cpp's RPC backend through ggml's C API (ctypes): llama-cpp-python binds llama.h only.

Two uses (issue 13): a helper node serves its device to another machine's replica
(`start_server`, in a child process: it never returns), and a split replica adds those
servers' devices to the ones its model loads onto (`rpc_devices`). Both need llama.cpp built
with `GGML_RPC=on` (README); `supported()` says whether this build has it.
"""

from __future__ import annotations

import ctypes
import socket
import struct
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
    `gpu_index`-th GPU, in ggml's order: CUDA_DEVICE_ORDER=PCI_BUS_ID makes it NVML's), else,
    when none is asked for, the CPU (a node without a GPU, or tests)."""
    devices = local_devices()
    gpus = _gpu_indices(devices)
    if gpu_index is not None:
        if gpu_index >= len(gpus):
            raise RuntimeError(f"no GPU {gpu_index} here to serve (llama.cpp sees {len(gpus)})")
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
        problem = _hello(endpoint, connect_timeout_s)
        if problem is not None:
            raise RuntimeError(f"llama.cpp's RPC server at {endpoint} {problem}")
        reg = add_server(endpoint.encode())
        if not reg:
            raise RuntimeError(f"cannot reach llama.cpp's RPC server at {endpoint}")
        out += [lib.ggml_backend_reg_dev_get(reg, i) for i in range(lib.ggml_backend_reg_dev_count(reg))]
    return out


RPC_CMD_HELLO, RPC_CONN_CAPS_SIZE, RPC_PROTO_MAJOR, RPC_PROTO_MINOR = 14, 24, 7, 0  # ggml-rpc.cpp, this build


def _hello(endpoint: str, timeout_s: float) -> str | None:
    """llama.cpp's HELLO, with a timeout: what is wrong with the server at `endpoint`, or None.
    llama.cpp's own client aborts the process on a failed or mismatched handshake and waits
    for ever on a server busy with another client (it serves one at a time)."""
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(bytes([RPC_CMD_HELLO]) + struct.pack("<Q", RPC_CONN_CAPS_SIZE) + bytes(RPC_CONN_CAPS_SIZE))
            size = struct.unpack("<Q", _recv(sock, 8))[0]
            if size != 4 + RPC_CONN_CAPS_SIZE:
                return f"answered the handshake with {size} bytes: not llama.cpp's RPC protocol v{RPC_PROTO_MAJOR}"
            major, minor, patch = _recv(sock, size)[:3]
    except (OSError, ValueError) as exc:
        return f"does not answer: {exc}"
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        return f"speaks RPC protocol {major}.{minor}.{patch}; this llama.cpp speaks {RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}"
    return None


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed the connection")
        data += chunk
    return data


def local_gpu_device(gpu_index: int) -> int | None:
    """This process's `gpu_index`-th GPU as a ggml device (None where it has none)."""
    gpus = _gpu_indices(local_devices())
    return _ggml().ggml_backend_dev_get(gpus[gpu_index]) if gpu_index < len(gpus) else None


def _gpu_indices(devices: list[tuple[str, int, str]]) -> list[int]:
    """ggml's indices of its GPUs, in its order."""
    return [i for i, (_, kind, _) in enumerate(devices) if kind == DEVICE_TYPE_GPU]
