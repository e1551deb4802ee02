"""Wake-on-LAN (issue 11): a request for a model that no live node can hold, but a sleeping
(gone) machine could, wakes that machine and waits for it. A mixin of the Controller, and
the thin sender.

- A node's MAC comes with its agent's reports (`join --wake-mac`, else the card that carries
  the node's address) and stays in its record while it sleeps, beside its last hardware report.
- Which sleeper: the pure `place()` over snapshots of the gone nodes that have a MAC, made
  from their last reports with the memory our replicas used there given back (they are not
  running when it wakes). The rules pick among them as among live nodes.
- The residency wait (`wait_until_ready`) asks `_hold_while_waking` each round: when the
  model has no replica, this tick's placement found it no live node (`unplaced`, or
  `cannot_place` after eviction), and a sleeper could hold it, the head broadcasts the magic
  packet (again every `WAKE_RESEND_S`) and the request waits, its model `waking`, up to
  `cluster.wake_timeout_s`; the load's own timeout counts from the machine's return. When
  the machine is back and has reported, placement (one full tick) takes over.
- A machine that does not wake in time: each waiting request gets a 503 that says so; new
  ones get it at once for `FAILED_WAKE_KEPT_S`, then a new request sends a new packet.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from orchestrator.core.placement import place, snapshot_from_hardware
from orchestrator.core.placement_types import NodeSnapshot
from orchestrator.core.wake_on_lan import WAKE_PORT, broadcast_targets, magic_packet
from worker.errors import RequestError

if TYPE_CHECKING:
    from orchestrator.controller import NodeRecord

log = logging.getLogger(__name__)
WAKE_RESEND_S = 15.0  # a packet may be lost: send it again while the machine sleeps
FAILED_WAKE_KEPT_S = 30.0  # after a wake timed out, new requests are told so at once for this long


# ---- the sender (the thin shell over orchestrator/core/wake_on_lan.py) ---------------------
def local_networks() -> list[str]:
    """This host's IPv4 interfaces as `address/netmask`."""
    import psutil

    out = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and a.netmask:
                out.append(f"{a.address}/{a.netmask}")
    return out


def send_wake_packet(mac: str, node_address: str | None, port: int = WAKE_PORT) -> list[str]:
    """Broadcast the magic packet for `mac` on the network of `node_address` (the sleeper's
    last address) and to 255.255.255.255; the addresses it went to. OSError if none took it."""
    packet = magic_packet(mac)
    reached, errors = [], []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        for target in broadcast_targets(node_address, local_networks()):
            try:
                sock.sendto(packet, (target, port))
                reached.append(target)
            except OSError as exc:  # e.g. no route for the limited broadcast: the other one may do
                errors.append(f"{target}: {exc.strerror or exc}")
    if not reached:
        raise OSError("; ".join(errors) or "no broadcast address")
    return reached


# ---- the controller's part ----------------------------------------------------------------
@dataclass
class WakeAttempt:
    node: str
    mac: str
    address: str
    models: set[str]
    sent_at: float  # monotonic: the first packet
    last_sent_at: float
    sent_to: list[str] = field(default_factory=list)
    failed: str | None = None  # the packet could not be sent at all
    back_at_tick: int | None = None  # the tick in which it was back and had reported

    def timed_out(self, now: float, limit_s: float) -> bool:
        return self.back_at_tick is None and now - self.sent_at > limit_s


class WakeOnLan:
    def _init_wake_on_lan(self) -> None:
        self.wake_attempts: dict[str, WakeAttempt] = {}  # node name -> its latest wake
        self.wake_sender = send_wake_packet  # (mac, address) -> addresses; tests put a fake here
        self._ours_shown: dict[str, tuple[dict[int, int], int]] = {}  # node -> (VRAM by GPU, RAM) of our replicas

    # ---- each tick -------------------------------------------------------------------------
    def _wake_on_lan_step(self) -> None:
        now = time.monotonic()
        for node in self.nodes.values():
            if node.alive and node.name:
                self._ours_shown[node.name] = self._memory_ours_shows(node)
        limit = self.config.cluster.wake_timeout_s
        for name, attempt in list(self.wake_attempts.items()):
            node = next((n for n in self.nodes.values() if n.name == name and n.alive), None)
            back = node is not None and node.hardware is not None and node.heard_at is not None
            if attempt.back_at_tick is not None:
                if self.ticks > attempt.back_at_tick:  # placement has seen it: the wait goes on as a load
                    del self.wake_attempts[name]
            elif back:
                attempt.back_at_tick = self.ticks
                took = now - attempt.sent_at
                self.record_event("woke", ", ".join(sorted(attempt.models)), name,
                                  f"{name} is back {took:.0f} s after Wake-on-LAN")
                log.info("%s woke %.0f s after Wake-on-LAN", name, took)
            elif attempt.timed_out(now, limit):
                if now - attempt.sent_at > limit + FAILED_WAKE_KEPT_S:
                    del self.wake_attempts[name]
            elif attempt.failed is None and now - attempt.last_sent_at >= WAKE_RESEND_S:
                self._send_wake(attempt)

    def _memory_ours_shows(self, node: NodeRecord) -> tuple[dict[int, int], int]:
        """What our ready replicas use on `node` that its measured free figures show as used."""
        vram: dict[int, int] = {}
        ram = 0
        for r in self.replicas.values():
            if r.node_id != node.node_id or r.state != "ready":
                continue
            freed_vram, freed_ram = self._freed_by(r)
            held_vram, held_ram = self._held_by(r)
            if r.assignment.gpu_index is not None:
                vram[r.assignment.gpu_index] = vram.get(r.assignment.gpu_index, 0) + max(0, freed_vram - held_vram)
            ram += max(0, freed_ram - held_ram)
        return vram, ram

    # ---- read by the residency wait and the views ------------------------------------------
    def could_wake_for(self, name: str) -> bool:
        """Whether a request for `name` should wait for a sleeping machine (one is waking for
        it, or could hold it while no live node can)."""
        return self._attempt_for(name) is not None or self._sleeper_for(name) is not None

    def _hold_while_waking(self, name: str, deadline: float, timeout_s: float) -> tuple[float, bool]:
        """One round of `wait_until_ready`: wake a sleeper for `name` if that is what it needs;
        (the wait's deadline, whether it waits for a machine to wake). A 503 when it did not."""
        attempt = self._attempt_for(name)
        if attempt is None:
            found = self._sleeper_for(name)
            if found is None:
                return deadline, False
            attempt = self._start_wake(found, name)
        now = time.monotonic()
        limit = self.config.cluster.wake_timeout_s
        if attempt.failed is not None:
            raise RequestError(
                f"The model '{name}' needs {attempt.node}, which sleeps, and the Wake-on-LAN packet to "
                f"{attempt.mac} could not be sent: {attempt.failed}", status=503, type="server_error",
                code="node_not_woken", retry_after_s=30)
        if attempt.timed_out(now, limit):
            raise RequestError(
                f"The model '{name}' needs {attempt.node}, which did not wake within {limit:g} s "
                f"(cluster.wake_timeout_s) of the Wake-on-LAN packet sent to {attempt.mac} via "
                f"{', '.join(attempt.sent_to)}", status=503, type="server_error", code="node_not_woken",
                retry_after_s=30)
        return max(deadline, now + timeout_s), True  # the load's own time counts from the return

    def waking_state(self, name: str) -> tuple[str, str] | None:
        """('waking', 'sent Wake-on-LAN to laptop-1 at 192.168.1.21 ...') while `name` waits for a machine."""
        attempt = self._attempt_for(name)
        if attempt is None or attempt.back_at_tick is not None or attempt.failed is not None:
            return None
        if attempt.timed_out(time.monotonic(), self.config.cluster.wake_timeout_s):
            return None
        if any(r.model == name for r in self.replicas.values()):
            return None
        age = time.monotonic() - attempt.sent_at
        return "waking", (f"sent Wake-on-LAN to {attempt.node} at {attempt.address} ({attempt.mac}) {age:.0f} s ago; "
                          f"waiting up to {self.config.cluster.wake_timeout_s:g} s for it")

    # ---- deciding and sending ----------------------------------------------------------------
    def _attempt_for(self, name: str) -> WakeAttempt | None:
        return next((a for a in self.wake_attempts.values() if name in a.models), None)

    def _sleeper_for(self, name: str) -> NodeRecord | None:
        """The sleeping machine the rules would put `name` on, when no live node takes it."""
        model = self.models.get(name)
        if model is None or model.replicas == 0 or any(r.model == name for r in self.replicas.values()):
            return None
        if name not in self.unplaced and name not in self.cannot_place or name not in self.shapes:
            return None  # placement has not found it homeless (yet): no reason to wake anyone
        demand = next(iter(self._demands(model)), None)
        if demand is None:
            return None
        live = {n.name for n in self.nodes.values() if n.alive}
        sleepers: dict[str, NodeRecord] = {}
        for node in self.nodes.values():
            if not node.alive and node.mac and node.hardware is not None and node.name and node.name not in live:
                sleepers[node.name] = node
        if not sleepers:
            return None
        result = place([self._sleeper_snapshot(n) for n in sleepers.values()], [demand])
        return sleepers[result.assignments[0].node] if result.assignments else None

    def _sleeper_snapshot(self, node: NodeRecord) -> NodeSnapshot:
        """A sleeping machine as it will be when it wakes: its last report, with what our
        replicas used there given back."""
        disk_free = node.store.disk_free_bytes if node.store is not None else None
        snapshot = snapshot_from_hardware(node.hardware, None, disk_free)
        vram, ram = self._ours_shown.get(node.name, ({}, 0))
        gpus = tuple(replace(g, vram_free_bytes=min(g.vram_total_bytes, g.vram_free_bytes + vram.get(g.index, 0)))
                     for g in snapshot.gpus)
        ram_free = snapshot.ram_free_bytes + ram
        if snapshot.ram_total_bytes:
            ram_free = min(snapshot.ram_total_bytes, ram_free)
        return replace(snapshot, ram_free_bytes=ram_free, gpus=gpus)

    def _start_wake(self, node: NodeRecord, model: str) -> WakeAttempt:
        running = self.wake_attempts.get(node.name)
        now = time.monotonic()
        if running is not None and not running.timed_out(now, self.config.cluster.wake_timeout_s):
            running.models.add(model)
            return running
        attempt = WakeAttempt(node.name, node.mac, node.address, {model}, now, now)
        self.wake_attempts[node.name] = attempt
        self._send_wake(attempt)
        if attempt.failed is None:
            self.record_event("waking", model, node.name,
                              f"sent Wake-on-LAN to {node.name} ({node.mac}) via {', '.join(attempt.sent_to)}: "
                              f"{model} fits on no machine awake")
        else:
            self.record_event("wake_failed", model, node.name, f"Wake-on-LAN to {node.name}: {attempt.failed}")
        self.wake()  # the next tick watches for its return
        return attempt

    def _send_wake(self, attempt: WakeAttempt) -> None:
        attempt.last_sent_at = time.monotonic()
        try:
            attempt.sent_to = list(self.wake_sender(attempt.mac, attempt.address))
        except (OSError, ValueError) as exc:
            attempt.failed = str(exc) or type(exc).__name__
            log.warning("Wake-on-LAN to %s (%s) failed: %s", attempt.node, attempt.mac, attempt.failed)
            return
        log.info("sent Wake-on-LAN to %s (%s) via %s", attempt.node, attempt.mac, ", ".join(attempt.sent_to))
