"""A worker machine's membership of the fleet, kept by `homefleet join` as long as it runs.

The keeper starts this machine's Ray node (`ray start --block`, labelled with its name) and
watches it: when the node's processes exit (the raylet died, the head declared the node
dead, the head went away for longer than Ray waits) or the head says the node is dead or
unknown, it stops what is left and starts the node again, with backoff (1 s doubling to
30 s, reset after a stable minute), one log line per attempt, until Ctrl-C or SIGTERM.

Before each start it asks the head's GCS which nodes are alive: a live node that already
carries the name is refused on the first join (a second machine under one name would be
one node to the scheduler) and waited out on a rejoin (the old record may just be dying).
The head is read without a driver, through a GCS client: this machine has no raylet yet.

On Ctrl-C or SIGTERM, before it stops the node, the keeper asks the head to drain it (its
models started elsewhere first, its requests finished) through the same GCS client, as a
key in Ray's KV (orchestrator/drain_channel.py), and waits for the answer, bounded by the
drain's timeout plus `DRAIN_ANSWER_MARGIN_S`; a second Ctrl-C leaves at once.
"""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.backoff import Backoff
from orchestrator.drain_channel import NAMESPACE, DrainRequest, answer_key, decode_answer, describe_drain, request_key
from orchestrator.ray_cluster import NODE_NAME_LABEL, RayProcess


DRAIN_ANSWER_MARGIN_S = 30.0  # beyond the drain's own timeout: the head's tick, Ray's KV
DRAIN_POLL_S = 0.5


@dataclass(frozen=True)
class HeadNode:
    """A node as the head's GCS records it."""

    node_id: str
    name: str | None
    address: str
    alive: bool


class HeadUnreachable(Exception):
    """The head's GCS did not answer (down, wrong address, a firewall)."""


class TokenRejected(Exception):
    """The head's GCS refused this machine's token."""


def name_clash(nodes: Iterable[HeadNode], name: str) -> HeadNode | None:
    """A live node that already carries `name`, if any."""
    return next((node for node in nodes if node.alive and node.name == name), None)


def new_node_named(nodes: Iterable[HeadNode], name: str, known_ids: set[str]) -> HeadNode | None:
    """The live node named `name` that was not there before this machine started its node: its own."""
    return next((node for node in nodes if node.alive and node.name == name and node.node_id not in known_ids), None)


class HeadNodes:
    """The head's node table, read from its GCS. Token auth: the token must be in the
    environment (RAY_AUTH_MODE, RAY_AUTH_TOKEN) before Ray is first imported."""

    def __init__(self, head_address: str, timeout_s: float = 5.0) -> None:
        self.head_address = head_address
        self.timeout_s = timeout_s
        self._client = None

    def nodes(self) -> list[HeadNode]:
        infos = self._call(lambda client: client.get_all_node_info(timeout=self.timeout_s))
        return [
            HeadNode(
                node_id=node_id.hex(),
                name=dict(info.labels).get(NODE_NAME_LABEL),
                address=info.node_manager_address,
                alive=info.state == 0,  # GcsNodeInfo.ALIVE
            )
            for node_id, info in infos.items()
        ]

    # ---- asking for a drain (orchestrator/drain_channel.py)
    def request_drain(self, request: DrainRequest) -> None:
        self._call(lambda c: c.internal_kv_put(request_key(request.node), request.encode(), True, NAMESPACE,
                                               timeout=self.timeout_s))

    def drain_answer(self, node: str, request_id: str) -> dict | None:
        value = self._call(lambda c: c.internal_kv_get(answer_key(node), NAMESPACE, timeout=self.timeout_s))
        return decode_answer(value, request_id)

    def forget_drain(self, node: str) -> None:
        """Remove this node's request and answer (a stale one, or one done with)."""
        for key in (request_key(node), answer_key(node)):
            self._call(lambda c, key=key: c.internal_kv_del(key, False, NAMESPACE, timeout=self.timeout_s))

    def _call(self, call):
        from ray.exceptions import AuthenticationError

        self._probe()  # Ray's client waits ~40 s for an address that does not answer; a socket says so at once
        try:
            if self._client is None:
                from ray._raylet import GcsClient

                self._client = GcsClient(address=self.head_address)
            return call(self._client)
        except AuthenticationError as exc:
            self._client = None
            raise TokenRejected(str(exc).split(". ", 1)[0]) from None
        except Exception as exc:  # RpcError, a GCS that restarted: connect again next time
            self._client = None
            raise HeadUnreachable(f"{type(exc).__name__}: {exc}") from None

    def _probe(self) -> None:
        host, _, port = self.head_address.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(self.timeout_s, 3.0)):
                pass
        except (OSError, ValueError) as exc:
            raise HeadUnreachable(getattr(exc, "strerror", None) or str(exc) or type(exc).__name__) from None


class NodeKeeper:
    """Keeps this machine's node in the fleet; `run()` returns the exit code of `homefleet join`.

    `start_node()` starts the node and returns its process; `head` reads the head's nodes;
    `say` prints one line. The clock, sleep and backoff are passed in for tests."""

    def __init__(
        self,
        name: str,
        head_address: str,
        start_node: Callable[[], RayProcess],
        head: HeadNodes,
        say: Callable[[str], None],
        log_path: Path | None = None,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        poll_s: float = 0.5,
        head_check_s: float = 5.0,
        drain_timeout_s: float = 0.0,
    ) -> None:
        self.name = name
        self.head_address = head_address
        self.start_node = start_node
        self.head = head
        self.say = say
        self.log_path = log_path
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.sleep = sleep
        self.poll_s = poll_s
        self.head_check_s = head_check_s
        self.drain_timeout_s = drain_timeout_s  # 0: leave without asking the head to drain
        self.attempts = 0
        self.own_ids: set[str] = set()  # Ray node IDs this keeper's starts registered as
        self.worker: RayProcess | None = None

    @property
    def ever_joined(self) -> bool:
        return bool(self.own_ids)

    def run(self) -> int:
        try:
            while True:
                code = self._try_once()
                if code is not None:
                    return code
        except KeyboardInterrupt:
            self.say(f"homefleet: node {self.name} leaving ...")
            self._drain_before_leaving()
            return 0
        finally:
            if self.worker is not None:
                self.worker.stop()

    def _try_once(self) -> int | None:
        """One admission check and, if admitted, one run of the node until it leaves the
        fleet; then the wait before the next try. An exit code ends `run`."""
        try:
            nodes = self.head.nodes()
        except HeadUnreachable as exc:
            return self._wait(f"head {self.head_address} unreachable ({exc})")
        except TokenRejected as exc:
            if not self.ever_joined:
                self.say(f"homefleet join: the head {self.head_address} refused this machine's token ({exc}): "
                         "use the head's token file (`homefleet token` on the head prints it)")
                return 2
            return self._wait(f"the head {self.head_address} refused this machine's token ({exc})")
        clash = name_clash(nodes, self.name)
        if clash is not None:
            if not self.ever_joined:
                self.say(f"homefleet join: the name {self.name} is already in use by a live node at {clash.address} "
                         f"(Ray node {clash.node_id[:8]}): give this machine another --name, or stop that node")
                return 1
            whose = ("this machine's previous node, not yet declared dead" if clash.node_id in self.own_ids
                     else "another node")
            return self._wait(f"the name {self.name} is still held by a live node at {clash.address} ({whose})")
        reason, ran_s = self._run_node({node.node_id for node in nodes})
        if not self.ever_joined:
            self.say(f"homefleet join: node {self.name} did not join {self.head_address}: {reason}"
                     + (f"; see {self.log_path}" if self.log_path else ""))
            return 1
        self.backoff.ran_for(ran_s)
        return self._wait(f"node {self.name} left the fleet: {reason}", action="rejoining")

    def _wait(self, why: str, action: str = "retrying") -> int | None:
        delay_s = self.backoff.next_delay_s()
        self.say(f"homefleet: {why}; {action} in {delay_s:g} s")
        self.sleep(delay_s)
        return None

    def _run_node(self, known_ids: set[str]) -> tuple[str, float]:
        """Start the node and watch it until it leaves the fleet; (why it left, how long it ran)."""
        self.attempts += 1
        log = f", log: {self.log_path}" if self.log_path else ""
        self.say(f"homefleet: node {self.name} joining {self.head_address} (attempt {self.attempts}{log})")
        started = self.clock()
        self._forget_drain()  # a request or answer left by an earlier run must not drain this one
        self.worker = self.start_node()
        reason = self._watch(self.worker, known_ids)  # on Ctrl-C, run() stops the worker after saying so
        self.worker.stop()  # still running when the head declared it dead
        self.worker = None
        return reason, self.clock() - started

    def _watch(self, worker: RayProcess, known_ids: set[str]) -> str:
        node_id: str | None = None
        next_check = self.clock()
        while True:
            code = worker.popen.poll()
            if code is not None:
                return f"its Ray processes exited (code {code})"
            if self.clock() >= next_check:
                # Until the head lists the node, look every second: its ID tells its record apart.
                next_check = self.clock() + (self.head_check_s if node_id else min(1.0, self.head_check_s))
                try:
                    nodes = self.head.nodes()
                except (HeadUnreachable, TokenRejected):
                    nodes = None  # Ray's own reconnect runs meanwhile; its processes exit if it gives up
                if nodes is not None and node_id is None:
                    mine = new_node_named(nodes, self.name, known_ids)
                    if mine is not None:
                        node_id = mine.node_id
                        self.own_ids.add(node_id)
                        self.say(f"homefleet: node {self.name} is in the fleet "
                                 f"(Ray node {node_id[:8]} at {mine.address})")
                elif nodes is not None:
                    record = next((node for node in nodes if node.node_id == node_id), None)
                    if record is None:
                        return "the head no longer knows it (the head restarted?)"
                    if not record.alive:
                        return "the head declared it dead"
            self.sleep(self.poll_s)

    # ---- leaving: drained first ------------------------------------------------------------
    def _drain_before_leaving(self) -> None:
        """Ask the head to drain this node and wait for its answer (bounded); a second
        Ctrl-C, or a head that cannot be reached, leaves at once."""
        if self.worker is None or not self.ever_joined or self.drain_timeout_s <= 0:
            return
        request = DrainRequest(self.name, uuid.uuid4().hex, self.drain_timeout_s)
        wait_s = self.drain_timeout_s + DRAIN_ANSWER_MARGIN_S
        self.say(f"homefleet: asking the head to drain {self.name} (up to {self.drain_timeout_s:g} s; "
                 "Ctrl-C again to leave now)")
        try:
            answer = self._await_drain(request, wait_s)
        except KeyboardInterrupt:
            self.say(f"homefleet: leaving without waiting for the drain of {self.name}")
            return
        except (HeadUnreachable, TokenRejected) as exc:
            self.say(f"homefleet: could not ask the head to drain {self.name} ({exc}); leaving")
            return
        finally:
            self._forget_drain()
        if answer is None:
            self.say(f"homefleet: the head did not report {self.name} drained within {wait_s:g} s; leaving")
        else:
            self.say("homefleet: " + describe_drain(answer))

    def _await_drain(self, request: DrainRequest, wait_s: float) -> dict | None:
        self.head.request_drain(request)
        deadline = self.clock() + wait_s
        while self.clock() < deadline:
            if self.worker.popen.poll() is not None:
                return None  # the node is gone already: nothing left to drain
            try:
                answer = self.head.drain_answer(self.name, request.request_id)
            except HeadUnreachable:
                answer = None  # a blip: ask again
            if answer is not None:
                return answer
            self.sleep(DRAIN_POLL_S)
        return None

    def _forget_drain(self) -> None:
        if self.drain_timeout_s <= 0:
            return
        try:
            self.head.forget_drain(self.name)
        except (HeadUnreachable, TokenRejected, KeyboardInterrupt):
            pass  # the head is away (the request dies with its GCS) or we are leaving anyway
