"""Hardware probe: CPU, RAM and NVIDIA GPUs of this machine, with live use.

A machine without an NVIDIA driver reports CPU only, without error. A hardware file
(`--hardware FILE`) replaces the probe's static figures so a node can act as another
machine in tests and plans; live use then comes from the file (or stays unknown).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import socket
from pathlib import Path

import psutil

from orchestrator.core.hardware import GpuInfo, NodeHardware

log = logging.getLogger(__name__)


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


class NvmlSession:
    """pynvml, initialised once per process; absent driver means no GPUs."""

    def __init__(self) -> None:
        self.nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
        except Exception as exc:  # no driver, no library, no device: CPU only
            log.debug("NVML unavailable: %s", exc)

    @property
    def available(self) -> bool:
        return self.nvml is not None

    def gpus(self) -> list[GpuInfo]:
        if self.nvml is None:
            return []
        nv = self.nvml
        driver = _text(nv.nvmlSystemGetDriverVersion())
        out = []
        for index in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            mem = nv.nvmlDeviceGetMemoryInfo(handle)
            try:
                util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            except nv.NVMLError:
                util = None
            try:
                major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
                capability = f"{major}.{minor}"
            except nv.NVMLError:
                capability = None
            out.append(
                GpuInfo(
                    index=index,
                    name=_text(nv.nvmlDeviceGetName(handle)),
                    vram_total_bytes=int(mem.total),
                    vram_free_bytes=int(mem.free),
                    vram_used_bytes=int(mem.used),
                    utilization_pct=util,
                    compute_capability=capability,
                    driver=driver,
                    memory_bandwidth_gbps=_bandwidth_gbps(nv, handle),
                )
            )
        return out

    def process_vram_bytes(self, pid: int) -> int | None:
        """VRAM this process holds across all GPUs (None without NVML)."""
        if self.nvml is None:
            return None
        nv = self.nvml
        total, seen = 0, False
        try:
            for index in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(index)
                for proc in nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid == pid:
                        seen = True
                        total += int(proc.usedGpuMemory or 0)
        except nv.NVMLError:  # MIG, vGPU, WSL: per-process figures are not always there
            return None
        # Not listed: no CUDA context here (CPU only), or a container hiding host pids.
        return total if seen else None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bandwidth_gbps(nv, handle) -> float | None:
    """Peak bandwidth from memory clock and bus width (DDR: two transfers a clock)."""
    try:
        clock_mhz = nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_MEM)
        bus_bits = nv.nvmlDeviceGetMemoryBusWidth(handle)
        return round(2 * clock_mhz * 1e6 * bus_bits / 8 / 1e9, 1)
    except Exception:
        return None


def probe(name: str | None = None, nvml: NvmlSession | None = None) -> NodeHardware:
    """The real machine, now."""
    vm = psutil.virtual_memory()
    nvml = nvml or NvmlSession()
    threads = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    return NodeHardware(
        name=name or socket.gethostname(),
        cpu_model=cpu_model_name(),
        cpu_cores=psutil.cpu_count(logical=False) or threads,
        cpu_threads=threads,
        cpu_utilization_pct=psutil.cpu_percent(interval=None),
        ram_total_bytes=int(vm.total),
        ram_available_bytes=int(vm.available),
        gpus=nvml.gpus(),
        rpc=engine_has_rpc(),
    )


@functools.cache
def engine_has_rpc() -> bool:
    """Whether this node's llama.cpp has the RPC backend (llama-cpp-python built with
    GGML_RPC=on ships libggml-rpc.so), seen without loading llama.cpp into the agent."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return False
    return (Path(spec.origin).parent / "lib" / "libggml-rpc.so").exists()


def overlay_live_use(declared: NodeHardware, measured: NodeHardware) -> NodeHardware:
    """A node acting as a declared machine: its static figures, with live use scaled in.

    Free memory is the declared total minus what this machine really has in use, so a
    model loaded on the node shows up as used on the machine it stands for.
    """
    ram_used = int(measured.ram_total_bytes) - measured.ram_available
    ram_available = max(0, int(declared.ram_total_bytes) - ram_used)
    if declared.ram_available_bytes is not None:
        ram_available = min(ram_available, declared.ram_available)
    gpus = []
    for gpu in declared.gpus:
        real = next((g for g in measured.gpus if g.index == gpu.index), None)
        used = int(real.vram_used_bytes or 0) if real else int(gpu.vram_used_bytes or 0)
        free = max(0, int(gpu.vram_total_bytes) - used)
        if gpu.vram_free_bytes is not None:
            free = min(free, gpu.vram_free)
        gpus.append(
            gpu.model_copy(
                update={
                    "vram_free_bytes": free,
                    "vram_used_bytes": int(gpu.vram_total_bytes) - free,
                    "utilization_pct": real.utilization_pct if real else gpu.utilization_pct,
                }
            )
        )
    return declared.model_copy(
        update={
            "ram_available_bytes": ram_available,
            "cpu_utilization_pct": measured.cpu_utilization_pct,
            "gpus": gpus,
            "rpc": declared.rpc and measured.rpc,  # a declared machine's RPC is only as real as this engine's
            "source": "file",
        }
    )
