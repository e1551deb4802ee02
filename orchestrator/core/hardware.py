"""What a node is made of and how much of it is free: the schema the probe reports.

The same schema is read from hardware files (`--hardware FILE`, `configs/machines/*.yaml`)
so that a test or a plan can run a node "as" another machine. Byte fields accept either an
integer or a human size such as "16 GiB" or "6GB" (pydantic's ByteSize).
"""

from __future__ import annotations

from pydantic import BaseModel, ByteSize, ConfigDict, Field

GIB = 1024**3
MIB = 1024**2


class GpuInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = Field(0, description="Device index as CUDA/NVML numbers it.")
    name: str = Field(..., description="Marketing name, e.g. 'NVIDIA GeForce RTX 4070 Ti'.")
    vram_total_bytes: ByteSize = Field(..., description="Total device memory.")
    vram_free_bytes: ByteSize | None = Field(
        None, description="Free device memory now (other programs included); total when unknown."
    )
    vram_used_bytes: ByteSize | None = Field(None, description="Used device memory now.")
    utilization_pct: float | None = Field(None, description="GPU busy percentage now.")
    compute_capability: str | None = Field(None, description="e.g. '8.9'.")
    driver: str | None = Field(None, description="NVIDIA driver version.")
    memory_bandwidth_gbps: float | None = Field(
        None, description="Peak memory bandwidth in GB/s, for decode speed predictions."
    )

    @property
    def vram_free(self) -> int:
        return int(self.vram_free_bytes if self.vram_free_bytes is not None else self.vram_total_bytes)


class NodeHardware(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Node name (hostname unless given).")
    cpu_model: str = Field("unknown", description="CPU model string.")
    cpu_cores: int = Field(1, ge=1, description="Physical cores.")
    cpu_threads: int = Field(1, ge=1, description="Logical CPUs.")
    cpu_utilization_pct: float | None = Field(None, description="CPU busy percentage now.")
    ram_total_bytes: ByteSize = Field(..., description="Installed RAM.")
    ram_available_bytes: ByteSize | None = Field(
        None, description="RAM available now (other programs included); total when unknown."
    )
    ram_bandwidth_gbps: float | None = Field(
        None, description="Peak RAM bandwidth in GB/s, for CPU decode speed predictions."
    )
    gpus: list[GpuInfo] = Field(default_factory=list, description="NVIDIA GPUs; empty for CPU only.")
    disk_free_bytes: ByteSize | None = Field(
        None, description="Declared free disk of the node's model store (to run a node as another machine); "
        "measured on the store's volume when unset."
    )
    rpc: bool = Field(
        False, description="Its engine has llama.cpp's RPC backend (llama_supports_rpc()), so its GPU may take part "
        "in a split of one model across machines; a hardware file may declare it."
    )
    link_rtt_ms: float | None = Field(
        None, gt=0, description="Network round trip to the head in ms (measured where known; default: a wired "
        "gigabit LAN), for the per-token cost of a split across machines."
    )
    link_mbps: float | None = Field(None, gt=0, description="Network bandwidth to the head in Mbit/s (default 1000).")
    source: str = Field(
        "probe",
        description="'probe' when measured on this machine, 'file' when declared by a hardware file "
        "(then memory our own replicas use on its GPUs is not visible to measurement).",
    )

    @property
    def ram_available(self) -> int:
        return int(self.ram_available_bytes if self.ram_available_bytes is not None else self.ram_total_bytes)

    @property
    def vram_total(self) -> int:
        return sum(int(g.vram_total_bytes) for g in self.gpus)


def format_duration(seconds: float) -> str:
    """45s, 12m, 2h05m, 3d: whole units, for people."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d"


def format_bytes(n: int | float | None) -> str:
    """1.5 GiB / 300 MiB, the way the CLI and reasons print memory."""
    if n is None:
        return "-"
    n = float(n)
    if abs(n) >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.0f} MiB"
