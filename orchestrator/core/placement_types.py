"""What placement takes and gives: node snapshots, model demands, assignments, margins.

Plain frozen values; `orchestrator.core.placement.place` is the function over them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, NamedTuple

from orchestrator.core.hardware import GIB, MIB, NodeHardware
from orchestrator.core.memory import NeedFunction, scaled_need
from orchestrator.core.rpc_split import describe_split

# gpu: whole on one GPU; split: GPU/CPU on one node; rpc: across the GPUs of several nodes
# (llama.cpp's RPC, orchestrator/core/rpc_split.py); cpu: CPU only.
AssignmentKind = Literal["gpu", "split", "rpc", "cpu"]
# Slots a replica gets by default (the model does not set `parallel`): as many as its node
# can hold, up to this many.
DEFAULT_MAX_SLOTS = 4
# slots -> need(k) of a replica that serves that many requests at once
SlotNeeds = Callable[[int], NeedFunction]


@dataclass(frozen=True)
class GpuSnapshot:
    index: int
    name: str
    vram_total_bytes: int
    vram_free_bytes: int


@dataclass(frozen=True)
class NodeSnapshot:
    """A node as placement sees it. Free figures are measured (other programs included).

    model_files: names of the models of which the node holds a verified copy; None means
    unknown (any). A node without the file can still be chosen: the file is copied there.
    ram_total_bytes: for the RAM margin; 0 means unknown (the free figure is used).
    disk_free_bytes: free bytes of the node's model store; None means unknown (no check).
    """

    name: str
    alive: bool
    ram_free_bytes: int
    gpus: tuple[GpuSnapshot, ...] = ()
    model_files: frozenset[str] | None = None
    ram_total_bytes: int = 0
    disk_free_bytes: int | None = None
    rpc: bool = False  # its engine has llama.cpp's RPC: its GPUs may take part in a split across machines


@dataclass(frozen=True)
class GpuRoom:
    """A GPU a split across machines may use, with the VRAM it can give now (the ledger's)."""

    node: str
    gpu_index: int
    gpu_name: str
    usable_bytes: int


@dataclass(frozen=True)
class SingleOption:
    """The best a single node does for a replica that fits no GPU whole: `gpu_layers` on
    `gpu_index` of `node` (None: CPU only)."""

    node: str
    gpu_index: int | None
    gpu_layers: int


@dataclass(frozen=True)
class ModelDemand:
    """One replica to place.

    n_layers: offloadable units (blocks + output layer); need(k) for k in 0..n_layers.
    gpu_layers: user override, exactly this many layers on the GPU (0 = CPU only; a
    negative value or one above n_layers means all layers).
    file_bytes: size of the model's file, copied to a chosen node that lacks it (0: unknown).
    keep_free_disk_bytes: disk a copy must leave free on the node's store.
    slots: requests the replica serves at once (each with the full context); `need` is
    the need at this many.
    need_for_slots: when set, placement picks the slot count, from `slots` (the floor the
    node is chosen with) up to `max_slots` (see orchestrator/core/placement.py "Slots");
    need_for_slots(slots) must be `need`. None: exactly `slots` (the model's `parallel`).
    """

    model: str
    replica: int
    n_layers: int
    need: NeedFunction = field(compare=False)
    pin_node: str | None = None
    gpu_layers: int | None = None
    keep_free_vram_bytes: int = 0
    file_bytes: int = 0
    keep_free_disk_bytes: int = 0
    slots: int = 1
    need_for_slots: SlotNeeds | None = field(default=None, compare=False)
    max_slots: int = DEFAULT_MAX_SLOTS

    def __post_init__(self) -> None:
        if self.n_layers < 0:
            raise ValueError(f"{self.model}: n_layers must be >= 0, got {self.n_layers}")
        if self.keep_free_vram_bytes < 0:
            raise ValueError(f"{self.model}: keep_free_vram_bytes must be >= 0")
        if self.slots < 1:
            raise ValueError(f"{self.model}: slots must be >= 1, got {self.slots}")

    @property
    def fixed_gpu_layers(self) -> int | None:
        """The override clamped to 0..n_layers (negative = all), or None when unset."""
        if self.gpu_layers is None:
            return None
        if self.gpu_layers < 0 or self.gpu_layers > self.n_layers:
            return self.n_layers
        return self.gpu_layers

    @property
    def picks_slots(self) -> bool:
        """Whether placement chooses the slot count (the model leaves `parallel` unset)."""
        return self.need_for_slots is not None and self.max_slots > self.slots

    def scaled(self, factor: float) -> ModelDemand:
        """The same demand with every need (at every slot count) multiplied by `factor`
        (a calibration from llama.cpp's dry run)."""
        by_slots = self.need_for_slots
        if by_slots is None:
            return replace(self, need=scaled_need(self.need, factor))
        cache: dict[int, NeedFunction] = {}

        def scaled_for_slots(n_slots: int) -> NeedFunction:
            if n_slots not in cache:
                cache[n_slots] = scaled_need(by_slots(n_slots), factor)
            return cache[n_slots]

        return replace(self, need=scaled_for_slots(self.slots), need_for_slots=scaled_for_slots)


@dataclass(frozen=True)
class GpuPart:
    """One node's GPU share of a split across machines (an `rpc` assignment)."""

    node: str
    gpu_index: int
    layers: int  # of the offloaded layers (llama.cpp's count), the first ones
    gpu_bytes: int


@dataclass(frozen=True)
class Assignment:
    model: str
    replica: int
    node: str
    gpu_index: int | None
    gpu_layers: int
    n_layers: int
    gpu_bytes: int
    ram_bytes: int
    kind: AssignmentKind
    parallel: int = 1  # slots: requests served at once, each with the full context
    # kind "rpc": the other nodes' GPUs, in layer order; this node's GPU takes the rest of
    # gpu_layers (gpu_bytes is its part).
    helpers: tuple[GpuPart, ...] = ()
    tokens_per_s: float | None = None  # predicted decode speed where a split was weighed
    split_why: str | None = None  # why a split across machines was (not) taken, in numbers

    @property
    def nodes(self) -> tuple[str, ...]:
        return (self.node, *(h.node for h in self.helpers))

    @property
    def home_layers(self) -> int:
        """Offloaded layers on this node's own GPU."""
        return self.gpu_layers - sum(h.layers for h in self.helpers)

    def describe(self) -> str:
        """`desktop 45 layers GPU + laptop-1 20 layers GPU (RPC)` for a split across machines."""
        return describe_split(self.node, self.home_layers, [(h.node, h.layers) for h in self.helpers])


@dataclass(frozen=True)
class SplitOffer:
    """A split across machines to take: `parts` in layer order, the main node's GPU last."""

    parts: tuple[GpuPart, ...]
    tokens_per_s: float | None
    why: str


# (demand, the RPC-capable GPUs' rooms, the best single-node option) -> the split to take, or
# why none is taken. Built by the caller from shapes and hardware (orchestrator/split_planner.py).
Splitter = Callable[[ModelDemand, Sequence[GpuRoom], SingleOption | None], SplitOffer | str]


@dataclass(frozen=True)
class Unplaced:
    """A replica that fits nowhere; reasons maps node name -> why not, in numbers."""

    model: str
    replica: int
    reasons: dict[str, str]

    @property
    def summary(self) -> str:
        if not self.reasons:
            return "no nodes in the cluster"
        return "; ".join(f"{node}: {reason}" for node, reason in self.reasons.items())


@dataclass(frozen=True)
class PlacementResult:
    assignments: tuple[Assignment, ...]
    unplaced: tuple[Unplaced, ...]


class Reservation(NamedTuple):
    """Memory promised on a node but not yet in its measured figures (replicas loading)."""

    vram_bytes_by_gpu: Mapping[int, int]
    ram_bytes: int


@dataclass(frozen=True)
class Margins:
    vram_min_bytes: int = 256 * MIB
    vram_fraction: float = 0.05
    ram_min_bytes: int = 1 * GIB
    ram_fraction: float = 0.05

    def vram_bytes(self, total_bytes: int) -> int:
        return max(self.vram_min_bytes, int(total_bytes * self.vram_fraction))

    def ram_bytes(self, total_bytes: int) -> int:
        return max(self.ram_min_bytes, int(total_bytes * self.ram_fraction))


DEFAULT_MARGINS = Margins()


def snapshot_from_hardware(
    hw: NodeHardware, model_files: frozenset[str] | set[str] | None = None, disk_free_bytes: int | None = None
) -> NodeSnapshot:
    """A live snapshot of a hardware report or file (free = total where not measured)."""
    return NodeSnapshot(
        disk_free_bytes=disk_free_bytes,
        name=hw.name,
        alive=True,
        ram_free_bytes=hw.ram_available,
        ram_total_bytes=int(hw.ram_total_bytes),
        gpus=tuple(GpuSnapshot(g.index, g.name, int(g.vram_total_bytes), g.vram_free) for g in hw.gpus),
        model_files=None if model_files is None else frozenset(model_files),
        rpc=hw.rpc,
    )


def reservations_for(assignments: Sequence[Assignment]) -> dict[str, Reservation]:
    """What `assignments` (replicas still loading) hold per node, as `place` takes it."""
    vram: dict[str, dict[int, int]] = {}
    ram: dict[str, int] = {}
    for a in assignments:
        by_gpu = vram.setdefault(a.node, {})
        if a.gpu_index is not None:
            by_gpu[a.gpu_index] = by_gpu.get(a.gpu_index, 0) + a.gpu_bytes
        ram[a.node] = ram.get(a.node, 0) + a.ram_bytes
        for h in a.helpers:
            helper = vram.setdefault(h.node, {})
            helper[h.gpu_index] = helper.get(h.gpu_index, 0) + h.gpu_bytes
            ram.setdefault(h.node, 0)
    return {node: Reservation(vram[node], ram[node]) for node in vram}
