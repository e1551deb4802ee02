"""`homefleet join` keeps its machine in the fleet: the backoff schedule, the name check
before each start, and the keeper's loop over a fake head and fake Ray processes (a fake
clock: no test waits)."""

from __future__ import annotations

import pytest

from orchestrator.backoff import Backoff
from orchestrator.membership import HeadNode, HeadUnreachable, NodeKeeper, TokenRejected, name_clash, new_node_named

NAME = "laptop-1"
HEAD = "192.168.1.10:6379"


# ----------------------------------------------------------------------------- backoff


def test_backoff_doubles_from_1_s_to_at_most_30_s():
    backoff = Backoff()
    assert [backoff.next_delay_s() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


@pytest.mark.parametrize("ran_s, next_delay_s", [(59.0, 8), (60.0, 1), (3600.0, 1)])
def test_backoff_starts_again_from_1_s_after_a_stable_run(ran_s, next_delay_s):
    backoff = Backoff(stable_s=60)
    for _ in range(3):
        backoff.next_delay_s()
    backoff.ran_for(ran_s)
    assert backoff.next_delay_s() == next_delay_s


def test_backoff_refuses_a_schedule_that_cannot_grow():
    with pytest.raises(ValueError, match="initial_s"):
        Backoff(initial_s=0)


# ----------------------------------------------------------------------------- the name check


def node(node_id: str, name: str | None = NAME, alive: bool = True, address: str = "192.168.1.21") -> HeadNode:
    return HeadNode(node_id=node_id, name=name, address=address, alive=alive)


@pytest.mark.parametrize("nodes, clash", [
    ([], None),
    ([node("a", name="desktop")], None),
    ([node("a", alive=False)], None),       # a dead record of the name is no clash
    ([node("a", name=None)], None),         # a node without our label
    ([node("a", alive=False), node("b")], "b"),
])
def test_only_a_live_node_of_the_same_name_clashes(nodes, clash):
    found = name_clash(nodes, NAME)
    assert (found.node_id if found else None) == clash


def test_the_own_node_is_the_live_one_of_the_name_that_is_new():
    nodes = [node("old", alive=False), node("other", name="desktop"), node("new")]
    assert new_node_named(nodes, NAME, {"old", "other"}).node_id == "new"
    assert new_node_named(nodes, NAME, {"old", "other", "new"}) is None


# ----------------------------------------------------------------------------- the keeper


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakePopen:
    """A `ray start --block` that exits with `code` after `exit_after_s` (None: runs until stopped)."""

    def __init__(self, exit_after_s: float | None, clock: FakeClock, code: int = 1) -> None:
        self.clock = clock
        self.exit_after_s = exit_after_s
        self.code = code
        self.started_at: float | None = None
        self.stopped_at: float | None = None

    @property
    def ended_at(self) -> float | None:
        if self.stopped_at is not None:
            return self.stopped_at
        if self.exit_after_s is not None and self.clock.now >= self.started_at + self.exit_after_s:
            return self.started_at + self.exit_after_s
        return None

    def poll(self) -> int | None:
        if self.stopped_at is not None:
            return -15
        return None if self.ended_at is None else self.code


class FakeWorker:
    def __init__(self, popen: FakePopen) -> None:
        self.popen = popen
        popen.started_at = popen.clock.now

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.stopped_at = self.popen.clock.now


class FakeHead:
    """The head's node table: `others`, plus each node a keeper started, listed `register_after_s`
    after its start and alive until `dead_after_s` after its processes ended (the head's health
    check), or until the test declares it dead. `failures` are raised by the next calls."""

    def __init__(self, clock: FakeClock, others: list[HeadNode] | None = None, register_after_s: float = 1.0,
                 dead_after_s: float = 0.0) -> None:
        self.clock = clock
        self.others = list(others or [])
        self.register_after_s = register_after_s
        self.dead_after_s = dead_after_s
        self.started: list[tuple[FakeWorker, str]] = []
        self.declared_dead: set[str] = set()
        self.forgotten = False  # a restarted head: it knows none of the nodes started so far
        self.failures: list[Exception] = []

    def nodes(self) -> list[HeadNode]:
        if self.failures:
            raise self.failures.pop(0)
        now = self.clock.now
        out = list(self.others)
        for worker, node_id in self.started:
            if now < worker.popen.started_at + self.register_after_s or (self.forgotten and node_id == "id-1"):
                continue
            ended = worker.popen.ended_at
            alive = (ended is None or now < ended + self.dead_after_s) and node_id not in self.declared_dead
            out.append(node(node_id, alive=alive))
        return out


def keeper_for(head: FakeHead, clock: FakeClock, workers: list[FakePopen], lines: list[str],
               ctrl_c_at_start: int | None = None) -> NodeKeeper:
    """A keeper over the fakes; Ctrl-C comes when it would start node number `ctrl_c_at_start`
    (counting from 0)."""
    started: list[FakeWorker] = []

    def start_node() -> FakeWorker:
        if len(started) == ctrl_c_at_start:
            raise KeyboardInterrupt
        worker = FakeWorker(workers[len(started)])
        started.append(worker)
        head.started.append((worker, f"id-{len(started)}"))
        return worker

    keeper = NodeKeeper(NAME, HEAD, start_node, head, lines.append, clock=clock, sleep=clock.sleep, poll_s=0.5)
    keeper.started = started
    return keeper


def delays(lines: list[str], marker: str) -> list[str]:
    return [line.rsplit(" in ", 1)[1] for line in lines if marker in line]


def test_a_first_join_under_a_name_a_live_node_holds_is_refused_naming_both():
    clock, lines = FakeClock(), []
    head = FakeHead(clock, others=[node("abcdef123456", address="192.168.1.22")])
    keeper = keeper_for(head, clock, [], lines)
    assert keeper.run() == 1
    assert keeper.started == []
    assert "the name laptop-1 is already in use by a live node at 192.168.1.22" in lines[-1]


def test_a_first_join_with_a_wrong_token_exits_2_and_says_where_the_token_is():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    head.failures = [TokenRejected("RPC error: InvalidAuthToken")]
    assert keeper_for(head, clock, [], lines).run() == 2
    assert "refused this machine's token" in lines[-1] and "homefleet token" in lines[-1]


def test_a_first_node_that_never_joins_exits_1_with_its_log():
    clock, lines = FakeClock(), []
    head = FakeHead(clock, register_after_s=100)
    keeper = keeper_for(head, clock, [FakePopen(3.0, clock, code=1)], lines)
    assert keeper.run() == 1
    assert "did not join" in lines[-1] and "code 1" in lines[-1]


def test_an_unreachable_head_is_waited_for_with_backoff_one_line_each():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    head.failures = [HeadUnreachable("Connection refused")] * 4
    keeper = keeper_for(head, clock, [], lines, ctrl_c_at_start=0)
    assert keeper.run() == 0
    assert delays(lines, "unreachable") == ["1 s", "2 s", "4 s", "8 s"]
    assert all(HEAD in line and "Connection refused" in line for line in lines if "unreachable" in line)


def test_a_node_whose_ray_processes_exit_joins_again_under_the_same_name():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    workers = [FakePopen(10.0, clock), FakePopen(10.0, clock)]
    keeper = keeper_for(head, clock, workers, lines, ctrl_c_at_start=2)  # Ctrl-C at the third start
    assert keeper.run() == 0
    assert len(keeper.started) == 2 and keeper.own_ids == {"id-1", "id-2"}
    assert delays(lines, "left the fleet: its Ray processes exited (code 1); rejoining") == ["1 s", "2 s"]
    assert sum("laptop-1 joining 192.168.1.10:6379 (attempt" in line for line in lines) == 3
    assert sum("is in the fleet" in line for line in lines) == 2


def test_a_rejoin_waits_while_the_old_record_of_its_name_is_still_alive():
    clock, lines = FakeClock(), []
    head = FakeHead(clock, dead_after_s=5.0)  # the head declares a silent node dead 5 s later
    keeper = keeper_for(head, clock, [FakePopen(10.0, clock)], lines, ctrl_c_at_start=1)
    assert keeper.run() == 0
    waits = [line for line in lines if "still held" in line]
    assert len(waits) == 2 and all("this machine's previous node, not yet declared dead" in w for w in waits)
    assert "(attempt 2" in lines[-2]  # then it joined again


def test_a_rejoin_waits_for_another_live_node_of_its_name_instead_of_exiting():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    keeper = keeper_for(head, clock, [FakePopen(10.0, clock)], lines, ctrl_c_at_start=1)
    real_nodes = head.nodes

    def nodes():
        taken = 10 <= clock.now < 30  # another machine took the name while this one was away
        return real_nodes() + ([node("intruder", address="192.168.1.99")] if taken else [])
    head.nodes = nodes
    assert keeper.run() == 0
    waits = [line for line in lines if "still held" in line]
    assert waits and all("192.168.1.99 (another node)" in w for w in waits)
    assert "(attempt 2" in lines[-2]


def test_a_node_the_head_declared_dead_is_stopped_and_started_again():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    workers = [FakePopen(None, clock)]
    keeper = keeper_for(head, clock, workers, lines, ctrl_c_at_start=1)
    real_nodes = head.nodes

    def nodes():
        if clock.now > 20:
            head.declared_dead.add("id-1")  # the laptop slept; its raylet still runs
        return real_nodes()
    head.nodes = nodes
    assert keeper.run() == 0
    assert workers[0].stopped_at is not None and "(attempt 2" in lines[-2]
    assert any("left the fleet: the head declared it dead" in line for line in lines)


def test_a_node_the_restarted_head_does_not_know_is_started_again():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    workers = [FakePopen(None, clock)]
    keeper = keeper_for(head, clock, workers, lines, ctrl_c_at_start=1)
    real_nodes = head.nodes

    def nodes():
        head.forgotten = clock.now > 20
        return real_nodes()
    head.nodes = nodes
    assert keeper.run() == 0
    assert workers[0].stopped_at is not None and "(attempt 2" in lines[-2]
    assert any("the head no longer knows it" in line for line in lines)


def test_a_stable_run_resets_the_backoff():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    workers = [FakePopen(5.0, clock), FakePopen(5.0, clock), FakePopen(120.0, clock)]
    keeper = keeper_for(head, clock, workers, lines, ctrl_c_at_start=3)
    assert keeper.run() == 0
    assert delays(lines, "rejoining") == ["1 s", "2 s", "1 s"]


def test_ctrl_c_stops_the_running_node_and_exits_0():
    clock, lines = FakeClock(), []
    head = FakeHead(clock)
    worker = FakePopen(None, clock)
    keeper = keeper_for(head, clock, [worker], lines)

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now > 30:
            raise KeyboardInterrupt
    keeper.sleep = sleep
    assert keeper.run() == 0
    assert worker.stopped_at is not None and lines[-1] == "homefleet: node laptop-1 leaving ..."
