"""Which idle replicas to unload: to make room for a model, and when their keep_alive ends.

Pure: snapshots and times in, values out (no Ray, no clock; `now` and `last_used` are one
monotonic clock's seconds). The caller decides which replicas are idle: it lists in
`evictable` only replicas with no request in flight or queued, not `load: always` and not
pinned; no other replica is ever a victim.

Making room, `plan_room(nodes, demand, evictable, now, current=..., reserved=...)`:
1. The rules without eviction: `place(nodes, [demand], current, reserved)`. Where that
   gives the demand as many GPU layers as it would get with every evictable replica gone
   (a whole-GPU placement anywhere counts as full), nothing is evicted: the plan has no
   victims. A small model thus takes the desktop's card rather than unloading a laptop's
   idle model (DESIGN: the rules evict only when no node has room).
2. Else the goal is the placement the rules give with every evictable replica gone (their
   memory added back to the free figures of their GPU and node). If the demand fits
   nowhere even then, the answer is the `Unplaced` of step 1 (its reasons in numbers).
3. Victims are taken on that goal's node only (the node the rules prefer), among its
   evictable replicas, never a replica of the demand's own model: the fewest replicas
   after which `place` gives the demand at least the goal's GPU layers. Among sets of
   that size, the one whose most recently used member was used least recently (then the
   second most recent, and so on): the replicas used last stay loaded. With one victim
   this is the least recently used replica that frees enough alone; a single later
   replica that suffices is preferred to two older ones. Exact search while the node has
   at most `EXACT_SEARCH_MAX` evictable replicas; above that, least-recently-used-first
   prefixes only.
The demand is placed by the same rules throughout: every call to `place` gets the other
running replicas as `current` and the loads in flight as `reserved`.

Idle unload, `expired(evictable, now)`: the replicas whose idle time reached their
keep_alive (None: never), least recently used first.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import combinations

from orchestrator.core.hardware import format_bytes, format_duration
from orchestrator.core.keep_alive import describe_keep_alive
from orchestrator.core.placement import place
from orchestrator.core.placement_types import (
    DEFAULT_MARGINS,
    Assignment,
    Margins,
    ModelDemand,
    NodeSnapshot,
    Reservation,
    Unplaced,
)

Reserved = Mapping[str, Reservation | tuple[Mapping[int, int], int]] | None  # as `place` takes it
EXACT_SEARCH_MAX = 10  # evictable replicas on one node searched exactly (2^10 placements at most)


@dataclass(frozen=True)
class Evictable:
    """A running replica that may be unloaded (the caller found it idle and unpinned).

    last_used: monotonic seconds of its last request (or of its load, before any request).
    keep_alive_s: idle seconds after which it unloads on its own; None = never.
    gpu_bytes, ram_bytes: what unloading it gives back, measured; None = the assignment's
    estimate.
    """

    assignment: Assignment
    last_used: float
    keep_alive_s: float | None = None
    gpu_bytes: int | None = None
    ram_bytes: int | None = None

    @property
    def freed_gpu_bytes(self) -> int:
        if self.assignment.gpu_index is None:
            return 0
        return self.assignment.gpu_bytes if self.gpu_bytes is None else self.gpu_bytes

    @property
    def freed_ram_bytes(self) -> int:
        return self.assignment.ram_bytes if self.ram_bytes is None else self.ram_bytes


@dataclass(frozen=True)
class RoomPlan:
    """Unload `victims` (least recently used first), then load the demand as `assignment`.

    No victims: the demand fits as it is. reasons: one line per victim, in numbers.
    """

    node: str
    victims: tuple[Assignment, ...]
    assignment: Assignment
    reasons: tuple[str, ...]


def plan_room(
    nodes: Sequence[NodeSnapshot],
    demand: ModelDemand,
    evictable: Sequence[Evictable],
    now: float,
    *,
    current: Sequence[Assignment] = (),
    reserved: Reserved = None,
    margins: Margins = DEFAULT_MARGINS,
) -> RoomPlan | Unplaced:
    """Where the demand goes and which idle replicas go first (rules in the module docstring)."""
    candidates = [e for e in evictable if e.assignment.model != demand.model]

    def attempt(victims: Sequence[Evictable]) -> Assignment | Unplaced:
        gone = {_key(v.assignment) for v in victims}
        result = place(
            freed_snapshots(nodes, victims), [demand], [a for a in current if _key(a) not in gone], reserved, margins
        )
        return result.assignments[0] if result.assignments else result.unplaced[0]

    as_is = attempt(())
    goal = attempt(candidates) if candidates else as_is
    if isinstance(goal, Unplaced):
        return as_is
    if isinstance(as_is, Assignment) and as_is.gpu_layers >= goal.gpu_layers:
        return RoomPlan(as_is.node, (), as_is, ())

    on_node = sorted((e for e in candidates if e.assignment.node == goal.node), key=_lru_order)
    for victims in _victim_sets(on_node):
        landed = attempt(victims)
        if isinstance(landed, Assignment) and landed.gpu_layers >= goal.gpu_layers:
            victims = sorted(victims, key=_lru_order)
            reasons = tuple(_reason(v, demand, landed, nodes, reserved, margins, now) for v in victims)
            return RoomPlan(landed.node, tuple(v.assignment for v in victims), landed, reasons)
    return as_is if isinstance(as_is, Unplaced) else RoomPlan(as_is.node, (), as_is, ())  # not reached


def expired(evictable: Sequence[Evictable], now: float) -> list[Evictable]:
    """Replicas idle for at least their keep_alive (0: at once; None: never), LRU first."""
    due = [e for e in evictable if e.keep_alive_s is not None and now - e.last_used >= e.keep_alive_s]
    return sorted(due, key=_lru_order)


def expiry_reason(e: Evictable, now: float) -> str:
    """'unloaded coder (idle 31m, keep_alive 30m) on laptop-1'."""
    return (f"unloaded {_label(e.assignment)} (idle {format_duration(now - e.last_used)}, "
            f"keep_alive {describe_keep_alive(e.keep_alive_s)}) on {e.assignment.node}")


# ---------------------------------------------------------------- the search


def _victim_sets(on_node: list[Evictable]) -> Iterator[list[Evictable]]:
    """Sets of the node's replicas (given LRU first) in the order the rule prefers them."""
    n = len(on_node)
    if n > EXACT_SEARCH_MAX:
        for size in range(1, n + 1):
            yield on_node[:size]
        return
    for size in range(1, n + 1):
        # Newest member first, smaller index = less recently used: the most recent stay.
        for indices in sorted(combinations(range(n), size), key=lambda c: c[::-1]):
            yield [on_node[i] for i in indices]


def freed_snapshots(nodes: Sequence[NodeSnapshot], victims: Sequence[Evictable]) -> list[NodeSnapshot]:
    """The snapshots as they will be once `victims` are unloaded (free figures capped at totals)."""
    if not victims:
        return list(nodes)
    ram: dict[str, int] = {}
    vram: dict[tuple[str, int], int] = {}
    for v in victims:
        a = v.assignment
        ram[a.node] = ram.get(a.node, 0) + v.freed_ram_bytes
        if a.gpu_index is not None:
            vram[a.node, a.gpu_index] = vram.get((a.node, a.gpu_index), 0) + v.freed_gpu_bytes
        for h in a.helpers:  # a split across machines gives back its helpers' GPUs too
            vram[h.node, h.gpu_index] = vram.get((h.node, h.gpu_index), 0) + h.gpu_bytes
            ram.setdefault(h.node, 0)
    out = []
    for n in nodes:
        if n.name not in ram:
            out.append(n)
            continue
        ram_free = n.ram_free_bytes + ram[n.name]
        if n.ram_total_bytes:
            ram_free = min(ram_free, n.ram_total_bytes)
        gpus = tuple(
            replace(g, vram_free_bytes=min(g.vram_total_bytes, g.vram_free_bytes + vram.get((n.name, g.index), 0)))
            for g in n.gpus
        )
        out.append(replace(n, ram_free_bytes=ram_free, gpus=gpus))
    return out


def _key(a: Assignment) -> tuple[str, int]:
    return a.model, a.replica


def _lru_order(e: Evictable) -> tuple:
    return e.last_used, e.assignment.model, e.assignment.replica


# ---------------------------------------------------------------- reasons, in numbers


def _reason(
    victim: Evictable,
    demand: ModelDemand,
    landed: Assignment,
    nodes: Sequence[NodeSnapshot],
    reserved: Reserved,
    margins: Margins,
    now: float,
) -> str:
    """'unloaded coder (idle 15m, 6.5 GiB VRAM) on desktop to make room for chat:
    needs 5.5 GiB VRAM for 32 layers, 2.2 GiB usable (3.0 GiB free)'."""
    held = format_bytes(victim.freed_gpu_bytes) + " VRAM" if victim.freed_gpu_bytes else \
        format_bytes(victim.freed_ram_bytes) + " RAM"
    head = (f"unloaded {_label(victim.assignment)} (idle {format_duration(now - victim.last_used)}, {held}) "
            f"on {victim.assignment.node} to make room for {_label(landed)}")
    return f"{head}: {_shortage(demand, landed, nodes, reserved, margins)}"


def _shortage(
    demand: ModelDemand,
    landed: Assignment,
    nodes: Sequence[NodeSnapshot],
    reserved: Reserved,
    margins: Margins,
) -> str:
    """What the demand needs on its node and what the node had before the evictions."""
    node = next(n for n in nodes if n.name == landed.node)
    held = (reserved or {}).get(node.name)
    held = Reservation(*held) if held else Reservation({}, 0)
    ram_usable = node.ram_free_bytes - margins.ram_bytes(node.ram_total_bytes or node.ram_free_bytes) - held.ram_bytes
    ram_part = (f"needs {format_bytes(landed.ram_bytes)} RAM, "
                f"{format_bytes(max(0, ram_usable))} usable ({format_bytes(node.ram_free_bytes)} free)")
    gpu = next((g for g in node.gpus if g.index == landed.gpu_index), None)
    if gpu is None:
        return ram_part
    vram_usable = (gpu.vram_free_bytes - margins.vram_bytes(gpu.vram_total_bytes)
                   - held.vram_bytes_by_gpu.get(gpu.index, 0) - demand.keep_free_vram_bytes)
    layers = f"{landed.gpu_layers} layer" + ("" if landed.gpu_layers == 1 else "s")
    vram_part = (f"needs {format_bytes(landed.gpu_bytes)} VRAM for {layers}, "
                 f"{format_bytes(max(0, vram_usable))} usable ({format_bytes(gpu.vram_free_bytes)} free)")
    if landed.ram_bytes > ram_usable and landed.gpu_bytes <= vram_usable:
        return ram_part
    if landed.ram_bytes > ram_usable:
        return f"{vram_part}; {ram_part}"
    return vram_part


def _label(a: Assignment) -> str:
    return a.model if a.replica == 0 else f"{a.model} replica {a.replica}"


