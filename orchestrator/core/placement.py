"""Which node (and GPU) runs each replica: a pure function over snapshots.

`place(nodes, demands, current, reserved)` returns a `PlacementResult`: one `Assignment`
per replica it could place and one `Unplaced` (with one reason per node, in numbers) per
replica it could not. "Does not fit" is a value, never an exception. No I/O, no clock.

Rules (DESIGN.md "Placement rules"), tried in this order for each replica:
1. Whole on one GPU: among the GPUs that hold all layers with a margin (and whose node's
   RAM holds the rest), the smallest card by total VRAM, ties to the most usable VRAM,
   then node name and GPU index. Small models land on the laptops so the big card stays
   free for big models.
2. Split GPU/CPU: the GPU that takes the most layers while its node's RAM holds the rest;
   ties to the most usable RAM, then node name and GPU index.
3. CPU only, on the node with the most usable RAM (ties to the node name).
4. Not placed, with one reason per node.
Between 2 and 3, chosen by speed: a replica that no GPU holds whole may be split across the
GPUs of two or more nodes whose engines have llama.cpp's RPC (kind "rpc"), when the caller's
`splitter` (orchestrator/split_planner.py: the plan of orchestrator/core/rpc_split.py and its
speed prediction) says that beats the best single-node option, or where there is none. The
main node holds the rest in RAM as for a whole GPU fit; each helper GPU its part. Pinned
replicas and gpu_layers overrides are never split across machines.
A gpu_layers override replaces rules 1-3: exactly that many layers on the smallest card
that holds them (0: rule 3).

Where the file is does not decide the node: a node without a verified copy gets one
copied. Among equally good choices (same card size in rule 1, same layer count in rule 2,
same usable RAM in rule 3) a node that holds a copy wins. A node that lacks the file and
has no disk room for it plus `keep_free_disk_bytes` is skipped, with its reason.

Order: replicas are taken pinned first, then by whole-GPU need (largest first), then
model name and replica, in two passes per group (pinned, then the others): first every
replica that fits whole on a GPU (and every override), then the rest (split, CPU,
reasons). So big models get the big card, and a model that fits no card whole never
takes, by a split, the card a smaller model fits on whole. Output follows the order of
`demands`.

Memory a node can give ("usable") is the measured free figure (other programs included)
minus a safety margin, minus reservations in flight (`reserved`, and replicas placed
earlier in the same call):
- VRAM: free - max(256 MiB, 5% of the card's total) - the model's keep_free_vram_bytes;
- RAM:  free - max(1 GiB, 5% of the node's total RAM). The RAM figure is "available"
  memory, which already excludes the OS and other programs, so the margin only covers
  their growth and estimation error (3.2 GiB on a 64 GiB machine).
Both are `Margins` defaults that a caller can change.

A replica in `current` whose node is alive stays where it is (its memory is already in
the measured figures, so it is not counted again), unless the user asked for a move: its
model is now pinned to another node, or its gpu_layers override changed (then the old
copy's memory still counts on its node until the caller stops it: a conservative plan).
One replica runs on one GPU (no multi-GPU tensor split); a CPU replica claims no VRAM.

Slots: a replica serves `slots` requests at once, each with the full context, so its KV
(and logits) grow with them. A model that sets `parallel` gets exactly that many (its
need is at that count: the rules above, and the reasons, use it). A model that leaves it
unset (`ModelDemand.need_for_slots`) is placed by the rules above at its floor (1 slot),
so the node, GPU and kind are the ones one slot gets; once every replica of the call is
placed, each of these takes, in placing order, the most slots (`max_slots`, 4, down to 2)
whose need fits the memory left on its node and GPU while it stays the same kind:
- whole on the GPU stays whole (more slots never turn a whole fit into a split: fewer
  slots whole beat more slots split), and a gpu_layers override keeps its layers;
- a split stays a split: the most layers that fit beside that many slots' KV, at least
  one, the rest in RAM (a split gives up GPU layers for slots: more requests at once,
  each step a little slower; set `parallel` to choose otherwise);
- CPU only stays on the CPU, in the RAM left.
Slots come last so that they never cost another replica its place or its kind: they use
only memory no replica of this call was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from orchestrator.core.hardware import format_bytes
from orchestrator.core.memory import MemoryNeed

from orchestrator.core.placement_types import (
    AssignmentKind,
    GpuPart,
    GpuRoom,
    GpuSnapshot,
    NodeSnapshot,
    SingleOption,
    SplitOffer,
    Splitter,
    ModelDemand,
    Assignment,
    Unplaced,
    PlacementResult,
    Reservation,
    Margins,
    DEFAULT_MARGINS,
    DEFAULT_MAX_SLOTS,
    SlotNeeds,
    snapshot_from_hardware,
    reservations_for,
)


__all__ = [
    "AssignmentKind",
    "GpuPart",
    "GpuRoom",
    "GpuSnapshot",
    "NodeSnapshot",
    "SingleOption",
    "SplitOffer",
    "Splitter",
    "ModelDemand",
    "Assignment",
    "Unplaced",
    "PlacementResult",
    "Reservation",
    "Margins",
    "DEFAULT_MARGINS",
    "DEFAULT_MAX_SLOTS",
    "SlotNeeds",
    "snapshot_from_hardware",
    "reservations_for",
    "place",
]


# ---------------------------------------------------------------- the ledger of one call


class _Gpu:
    __slots__ = ("node", "index", "name", "total_bytes", "free_bytes", "usable_bytes", "claimed_bytes", "_room_texts")

    def __init__(self, node: str, gpu: GpuSnapshot, reserved_bytes: int, margins: Margins) -> None:
        self.node = node
        self.index = gpu.index
        self.name = gpu.name
        self.total_bytes = gpu.vram_total_bytes
        self.free_bytes = gpu.vram_free_bytes
        self.usable_bytes = gpu.vram_free_bytes - margins.vram_bytes(gpu.vram_total_bytes) - reserved_bytes
        self.claimed_bytes = reserved_bytes  # in flight before this call, and placed in it
        self._room_texts: dict[int, str] = {}

    def take(self, vram_bytes: int) -> None:
        self.usable_bytes -= vram_bytes
        self.claimed_bytes += vram_bytes
        self._room_texts.clear()

    def room_text(self, keep_free_bytes: int) -> str:
        """'4.1 GiB usable (5.0 GiB free)', formatted once per state (reasons are many)."""
        text = self._room_texts.get(keep_free_bytes)
        if text is None:
            text = self._room_texts[keep_free_bytes] = _room(
                self.usable_bytes - keep_free_bytes, self.free_bytes, self.claimed_bytes
            )
        return text


class _Node:
    __slots__ = ("snapshot", "name", "free_ram_bytes", "usable_ram_bytes", "claimed_ram_bytes", "gpus", "_room_text",
                 "disk_claimed_bytes")

    def __init__(self, snapshot: NodeSnapshot, reserved: Reservation | None, margins: Margins) -> None:
        vram_reserved = reserved.vram_bytes_by_gpu if reserved else {}
        self.snapshot = snapshot
        self.name = snapshot.name
        self.free_ram_bytes = snapshot.ram_free_bytes
        ram_total = snapshot.ram_total_bytes or snapshot.ram_free_bytes
        self.claimed_ram_bytes = reserved.ram_bytes if reserved else 0
        self.usable_ram_bytes = snapshot.ram_free_bytes - margins.ram_bytes(ram_total) - self.claimed_ram_bytes
        self.gpus = [_Gpu(snapshot.name, g, vram_reserved.get(g.index, 0), margins) for g in snapshot.gpus]
        self._room_text: str | None = None
        self.disk_claimed_bytes = 0  # files to be copied here by replicas placed in this call

    def has_file(self, model: str) -> bool:
        files = self.snapshot.model_files
        return files is None or model in files

    def disk_missing_bytes(self, d: ModelDemand) -> int:
        """How many bytes of disk the node lacks to take a copy of d's file (0: room, or no copy needed)."""
        free = self.snapshot.disk_free_bytes
        if free is None or not d.file_bytes or self.has_file(d.model):
            return 0
        return max(0, d.file_bytes + d.keep_free_disk_bytes + self.disk_claimed_bytes - free)

    def take(self, ram_bytes: int) -> None:
        self.usable_ram_bytes -= ram_bytes
        self.claimed_ram_bytes += ram_bytes
        self._room_text = None

    def room_text(self) -> str:
        if self._room_text is None:
            self._room_text = _room(self.usable_ram_bytes, self.free_ram_bytes, self.claimed_ram_bytes)
        return self._room_text


_Choice = tuple[_Node, _Gpu | None, int]  # node, GPU (None: CPU only), layers on the GPU


class _Need:
    """need(k) of one demand, each k computed once; the layer search memoized by VRAM."""

    __slots__ = ("demand", "key", "_cache", "_texts", "_within", "_by_slots")

    def __init__(self, demand: ModelDemand) -> None:
        self.demand = demand
        self.key = (demand.model, demand.replica)
        self._cache: dict[int, MemoryNeed] = {}
        self._texts: dict[int, str] = {}
        self._within: dict[int, int] = {}
        self._by_slots: dict[int, _Need] = {}

    def with_slots(self, n_slots: int) -> _Need:
        """The same replica serving `n_slots` requests at once (demands that pick slots)."""
        d = self.demand
        if n_slots == d.slots or d.need_for_slots is None:
            return self
        need = self._by_slots.get(n_slots)
        if need is None:
            need = self._by_slots[n_slots] = _Need(replace(d, need=d.need_for_slots(n_slots), slots=n_slots))
        return need

    def at(self, k: int) -> MemoryNeed:
        need = self._cache.get(k)
        if need is None:
            need = self._cache[k] = self.demand.need(k)
        return need

    def gpu_text(self, k: int) -> str:
        return self._text(k, self.at(k).gpu_bytes)

    def ram_text(self, k: int) -> str:
        return self._text(-1 - k, self.at(k).ram_bytes)

    def _text(self, key: int, n_bytes: int) -> str:
        text = self._texts.get(key)
        if text is None:
            text = self._texts[key] = format_bytes(n_bytes)
        return text

    def most_layers_within(self, vram_bytes: int) -> int:
        """Largest k in 0..n_layers with need(k).gpu_bytes <= vram_bytes (binary search)."""
        k = self._within.get(vram_bytes)
        if k is None:
            k = self._within[vram_bytes] = self._search_layers(vram_bytes)
        return k

    def _search_layers(self, vram_bytes: int) -> int:
        """Bisection: its probe points repeat across searches, so need(k) stays cached."""
        n = self.demand.n_layers
        if n <= 0 or self.at(1).gpu_bytes > vram_bytes:
            return 0
        lo, hi = 1, n  # need(lo) fits; the answer is in lo..hi
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.at(mid).gpu_bytes <= vram_bytes:
                lo = mid
            else:
                hi = mid - 1
        return lo


# ---------------------------------------------------------------- the public function


def place(
    nodes: Sequence[NodeSnapshot],
    demands: Sequence[ModelDemand],
    current: Sequence[Assignment] = (),
    reserved: Mapping[str, Reservation | tuple[Mapping[int, int], int]] | None = None,
    margins: Margins = DEFAULT_MARGINS,
    splitter: Splitter | None = None,
) -> PlacementResult:
    """Place every demand (see the module docstring for the rules); without a `splitter`,
    nothing is split across machines.

    Node names must be unique (ValueError otherwise: an input error, not a misfit).
    """
    ledger: dict[str, _Node] = {}
    for snapshot in nodes:
        if snapshot.name in ledger:
            raise ValueError(f"two nodes named {snapshot.name!r}")
        held = (reserved or {}).get(snapshot.name)
        ledger[snapshot.name] = _Node(snapshot, Reservation(*held) if held else None, margins)
    ordered = sorted(ledger.values(), key=lambda n: n.name)

    running: dict[tuple[str, int], Assignment] = {}
    for a in current:
        running.setdefault((a.model, a.replica), a)

    outcome: dict[tuple[str, int], Assignment | Unplaced | None] = {}
    to_place: list[_Need] = []
    for demand in demands:
        key = (demand.model, demand.replica)
        if key in outcome:
            continue
        kept = running.get(key)
        if kept is not None and _stays(kept, demand, ledger):
            outcome[key] = kept
        else:
            outcome[key] = None  # filled below; the dict keeps the input order
            to_place.append(_Need(demand))

    to_place.sort(key=_placing_order)
    pinned = [need for need in to_place if need.demand.pin_node is not None]
    for group in (pinned, to_place[len(pinned):]):  # pinned replicas have first call on their node
        for need, chosen in _place_group(group, ordered, ledger, splitter):
            outcome[need.key] = chosen
    for need in to_place:  # slots last, from what no replica of this call was given
        placed = outcome[need.key]
        if need.demand.picks_slots and isinstance(placed, Assignment) and placed.kind != "rpc":
            outcome[need.key] = _grow_slots(need, placed, ledger[placed.node])

    values = list(outcome.values())
    return PlacementResult(
        assignments=tuple(v for v in values if isinstance(v, Assignment)),
        unplaced=tuple(v for v in values if isinstance(v, Unplaced)),
    )


def _place_group(
    group: list[_Need], ordered: list[_Node], ledger: Mapping[str, _Node], splitter: Splitter | None = None
) -> list[tuple[_Need, Assignment | Unplaced]]:
    """Two passes over `group` (already in placing order): whole first, then the rest."""
    placed: list[tuple[_Need, Assignment | Unplaced]] = []
    rest: list[tuple[_Need, list[_Node]]] = []
    for need in group:  # pass 1: whole on one GPU, or exactly the user's gpu_layers
        candidates = [n for n in ordered if _why_excluded(n, need.demand) is None]
        chosen = _choose_first(need, candidates)
        if chosen is None:
            rest.append((need, candidates))
        else:
            placed.append((need, _commit(need, *chosen)))
    for need, candidates in rest:  # pass 2: split, across machines if faster, else CPU only, else reasons
        chosen = _choose_rest(need, candidates)
        offer = _offer_split(need, [n for n in ordered if n.snapshot.alive], chosen, splitter)
        if isinstance(offer, SplitOffer):
            offer = _commit_split(need, offer, ledger, candidates)
        if isinstance(offer, Assignment):
            placed.append((need, offer))
        elif chosen:
            placed.append((need, replace(_commit(need, *chosen), split_why=offer)))
        else:
            placed.append((need, _unplaced(need, ordered, ledger, offer)))
    return placed


def _stays(running: Assignment, demand: ModelDemand, ledger: Mapping[str, _Node]) -> bool:
    for name in running.nodes:  # a split across machines needs every one of its nodes
        node = ledger.get(name)
        if node is None or not node.snapshot.alive:
            return False
    if demand.pin_node is not None and demand.pin_node != running.node:
        return False
    fixed = demand.fixed_gpu_layers
    return fixed is None or fixed == running.gpu_layers


def _placing_order(need: _Need) -> tuple:
    d = need.demand
    whole_gpu_bytes = need.at(d.n_layers).gpu_bytes if d.n_layers else 0
    return (d.pin_node is None, -whole_gpu_bytes, d.model, d.replica)


def _choose_first(need: _Need, candidates: list[_Node]) -> _Choice | None:
    fixed = need.demand.fixed_gpu_layers
    if fixed == 0:
        return _choose_cpu(need, candidates)
    return _choose_smallest_gpu(need, candidates, need.demand.n_layers if fixed is None else fixed)


def _choose_rest(need: _Need, candidates: list[_Node]) -> _Choice | None:
    if need.demand.fixed_gpu_layers is not None:
        return None  # the override fitted nowhere in pass 1, and memory only shrank since
    return _choose_split(need, candidates) or _choose_cpu(need, candidates)


def _unplaced(need: _Need, ordered: list[_Node], ledger: Mapping[str, _Node], split_why: str | None = None) -> Unplaced:
    d = need.demand
    reasons = {n.name: _why_excluded(n, d) or _why_not_fits(need, n, d.fixed_gpu_layers) for n in ordered}
    if d.pin_node is not None and d.pin_node not in ledger:
        reasons[d.pin_node] = "pinned node is not in the cluster"
    reasons = {name: reasons[name] for name in sorted(reasons)}
    if split_why:
        reasons[SPLIT_REASON_KEY] = split_why
    return Unplaced(d.model, d.replica, reasons)


# ---------------------------------------------------------------- across machines (RPC)

SPLIT_REASON_KEY = "across machines (RPC)"  # Unplaced.reasons' entry for the split that was weighed


def _offer_split(need: _Need, alive: list[_Node], single: _Choice | None,
                 splitter: Splitter | None) -> SplitOffer | str | None:
    """What the splitter offers over `single` (the best single-node choice, or None); None
    where a split across machines is not considered at all. Any live node's GPU may help (a
    helper needs no copy of the file); the main node must be a candidate (_commit_split)."""
    d = need.demand
    if splitter is None or d.pin_node is not None or d.fixed_gpu_layers is not None or d.n_layers < 2:
        return None
    rooms = [GpuRoom(n.name, g.index, g.name, _vram_for(g, d))
             for n in alive if n.snapshot.rpc for g in n.gpus if _vram_for(g, d) > 0]
    if len({r.node for r in rooms}) < 2:
        return None
    best = None if single is None else SingleOption(single[0].name, single[1].index if single[1] else None, single[2])
    return splitter(d, rooms, best)


def _commit_split(need: _Need, offer: SplitOffer, ledger: Mapping[str, _Node],
                  candidates: list[_Node]) -> Assignment | str:
    """Take the offer's memory off the ledger: the main node's RAM (as for a whole GPU fit) and
    each part on its GPU; or why the main node cannot hold its part."""
    d = need.demand
    main = offer.parts[-1]
    node = ledger[main.node]
    if node not in candidates:  # e.g. no disk room for the file there
        return f"split not taken: its main node {main.node} cannot run it ({_why_excluded(node, d)})"
    ram_bytes = need.at(d.n_layers).ram_bytes
    if ram_bytes > node.usable_ram_bytes:
        return f"split not taken: its main node {main.node} needs {need.ram_text(d.n_layers)} RAM, {node.room_text()}"
    node.take(ram_bytes)
    if not node.has_file(d.model):
        node.disk_claimed_bytes += d.file_bytes
    for part in offer.parts:
        next(g for g in ledger[part.node].gpus if g.index == part.gpu_index).take(part.gpu_bytes)
    return Assignment(
        model=d.model, replica=d.replica, node=main.node, gpu_index=main.gpu_index, gpu_layers=d.n_layers,
        n_layers=d.n_layers, gpu_bytes=main.gpu_bytes, ram_bytes=ram_bytes, kind="rpc", parallel=d.slots,
        helpers=offer.parts[:-1], tokens_per_s=offer.tokens_per_s, split_why=offer.why,
    )


def _why_excluded(node: _Node, d: ModelDemand) -> str | None:
    if d.pin_node is not None and node.name != d.pin_node:
        return f"{d.model} is pinned to {d.pin_node}"
    if not node.snapshot.alive:
        return "node is gone"
    if node.disk_missing_bytes(d):
        free = node.snapshot.disk_free_bytes or 0
        promised = f", {format_bytes(node.disk_claimed_bytes)} promised to other copies" if node.disk_claimed_bytes else ""
        return (f"needs {format_bytes(d.file_bytes)} disk for the file of {d.model} "
                f"(+{format_bytes(d.keep_free_disk_bytes)} kept free), {format_bytes(free)} free{promised}")
    return None


def _vram_for(gpu: _Gpu, d: ModelDemand) -> int:
    return gpu.usable_bytes - d.keep_free_vram_bytes


def _choose_smallest_gpu(need: _Need, candidates: list[_Node], k: int) -> _Choice | None:
    """Rule 1 (k = all layers) and the gpu_layers override: the smallest card that holds
    k layers while its node's RAM holds the rest; ties to the most usable VRAM."""
    if k <= 0:
        return None
    at_k = need.at(k)
    best: tuple | None = None
    choice: _Choice | None = None
    for node in candidates:
        if at_k.ram_bytes > node.usable_ram_bytes:
            continue
        for gpu in node.gpus:
            vram = _vram_for(gpu, need.demand)
            if at_k.gpu_bytes <= vram:
                rank = (gpu.total_bytes, not node.has_file(need.demand.model), -vram, node.name, gpu.index)
                if best is None or rank < best:
                    best, choice = rank, (node, gpu, k)
    return choice


def _choose_split(need: _Need, candidates: list[_Node]) -> _Choice | None:
    """The GPU that takes the most layers while its node's RAM holds the rest.

    GPUs are tried by usable VRAM, largest first: layers that fit only grow with VRAM, so
    after the first GPU that can take a split, the others can at most tie with it (checked
    with need(k) already known), and the layer search runs once or a few times, not per GPU.
    """
    d = need.demand
    upper = d.n_layers - 1
    if upper <= 0:
        return None
    gpus = sorted(((_vram_for(g, d), n, g) for n in candidates for g in n.gpus), key=lambda t: -t[0])
    best: tuple | None = None
    choice: _Choice | None = None
    for vram, node, gpu in gpus:
        if choice is not None:
            k = choice[2]
            if need.at(k).gpu_bytes > vram:
                break  # this GPU and every one after it takes fewer layers
        else:
            k = min(need.most_layers_within(vram), upper)
            if k <= 0:
                break
        if need.at(k).ram_bytes > node.usable_ram_bytes:
            continue  # fewer layers only need more RAM: this GPU cannot take any split
        rank = (not node.has_file(d.model), -node.usable_ram_bytes, node.name, gpu.index)
        if best is None or rank < best:
            best, choice = rank, (node, gpu, k)
    return choice


def _choose_cpu(need: _Need, candidates: list[_Node]) -> _Choice | None:
    ram_bytes = need.at(0).ram_bytes
    fitting = [n for n in candidates if ram_bytes <= n.usable_ram_bytes]
    if not fitting:
        return None
    node = min(fitting, key=lambda n: (-n.usable_ram_bytes, not n.has_file(need.demand.model), n.name))
    return node, None, 0


def _commit(need: _Need, node: _Node, gpu: _Gpu | None, k: int) -> Assignment:
    """Record the choice and take its memory off the ledger (reservation in flight)."""
    d = need.demand
    at_k = need.at(k)
    gpu_bytes = at_k.gpu_bytes if gpu is not None else 0
    node.take(at_k.ram_bytes)
    if not node.has_file(d.model):
        node.disk_claimed_bytes += d.file_bytes
    if gpu is not None:
        gpu.take(gpu_bytes)
    kind: AssignmentKind = "cpu" if gpu is None else ("gpu" if k == d.n_layers else "split")
    return Assignment(
        model=d.model,
        replica=d.replica,
        node=node.name,
        gpu_index=None if gpu is None else gpu.index,
        gpu_layers=k if gpu is not None else 0,
        n_layers=d.n_layers,
        gpu_bytes=gpu_bytes,
        ram_bytes=at_k.ram_bytes,
        kind=kind,
        parallel=d.slots,
    )


def _grow_slots(need: _Need, placed: Assignment, node: _Node) -> Assignment:
    """The most slots (max_slots down to the floor + 1) that fit where `placed` is, in the
    memory it holds plus what is left there, the same kind (module docstring, "Slots")."""
    d = need.demand
    gpu = next((g for g in node.gpus if g.index == placed.gpu_index), None) if placed.gpu_index is not None else None
    ram_room = node.usable_ram_bytes + placed.ram_bytes
    vram_room = _vram_for(gpu, d) + placed.gpu_bytes if gpu is not None else 0
    for n_slots in range(d.max_slots, d.slots, -1):
        more = need.with_slots(n_slots)
        k = _layers_with_slots(more, placed, vram_room)
        if k is None:
            continue
        at_k = more.at(k)
        if (gpu is not None and at_k.gpu_bytes > vram_room) or at_k.ram_bytes > ram_room:
            continue
        node.take(at_k.ram_bytes - placed.ram_bytes)
        gpu_bytes = at_k.gpu_bytes if gpu is not None else 0
        if gpu is not None:
            gpu.take(gpu_bytes - placed.gpu_bytes)
        return replace(placed, gpu_layers=k, gpu_bytes=gpu_bytes, ram_bytes=at_k.ram_bytes, parallel=n_slots)
    return placed


def _layers_with_slots(more: _Need, placed: Assignment, vram_room: int) -> int | None:
    """GPU layers of `placed`'s kind with more slots; None when that kind cannot have them."""
    if placed.kind != "split" or more.demand.fixed_gpu_layers is not None:
        return placed.gpu_layers  # whole, CPU only, or the user's gpu_layers: the layers stay
    k = min(more.most_layers_within(vram_room), more.demand.n_layers - 1)  # a split stays a split
    return k if k >= 1 else None


# ---------------------------------------------------------------- reasons, in numbers


def _layers(k: int) -> str:
    return f"{k} layer" if k == 1 else f"{k} layers"


def _room(usable_bytes: int, free_bytes: int, claimed_bytes: int) -> str:
    """'5.7 GiB usable (16.0 GiB free, 9.5 GiB promised to other replicas)'."""
    promised = f", {format_bytes(claimed_bytes)} promised to other replicas" if claimed_bytes else ""
    return f"{format_bytes(max(0, usable_bytes))} usable ({format_bytes(free_bytes)} free{promised})"


def _why_not_fits(need: _Need, node: _Node, fixed: int | None) -> str:
    """One line that proves the replica fits nowhere on this node (at its floor of slots:
    with more, it would need more)."""
    d = need.demand
    slots = f" with {d.slots} slots" if d.slots > 1 else ""
    if fixed == 0:
        return f"gpu_layers=0: needs {need.ram_text(0)} RAM on CPU{slots}, {node.room_text()}"
    if fixed is not None and not node.gpus:
        return f"gpu_layers={fixed} but the node has no GPU"
    if not node.gpus or d.n_layers == 0:
        return f"no GPU; needs {need.ram_text(0)} RAM on CPU{slots}, {node.room_text()}"
    gpu = node.gpus[0] if len(node.gpus) == 1 else max(node.gpus, key=lambda g: (g.usable_bytes, -g.index))
    vram = _vram_for(gpu, d)
    layers = d.n_layers if fixed is None else fixed
    gpu_label = f"GPU {gpu.index} " if len(node.gpus) > 1 else ""
    keep = f" (keeping {format_bytes(d.keep_free_vram_bytes)} free)" if d.keep_free_vram_bytes else ""
    vram_part = (
        f"needs {need.gpu_text(layers)} VRAM for {_layers(layers)}{slots}{keep}, "
        f"{gpu_label}{gpu.room_text(d.keep_free_vram_bytes)}"
    )
    if fixed is not None:
        if need.at(fixed).gpu_bytes > vram:
            return vram_part
        return f"with {_layers(fixed)} on GPU needs {need.ram_text(fixed)} RAM, {node.room_text()}"
    k = need.most_layers_within(vram)
    if k == 0:
        return f"{vram_part}; needs {need.ram_text(0)} RAM on CPU, {node.room_text()}"
    return f"{vram_part}; with {_layers(k)} on GPU needs {need.ram_text(k)} RAM, {node.room_text()}"
