"""The event log: ids that only grow, `since=` paging, `GET /api/events` through the real app,
`homefleet events` (one line each, `--follow`), and the controller recording each kind the
issue names where it happens, with its why (against the fake cluster of test_controller)."""

from __future__ import annotations

import argparse
import io
import json
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from orchestrator.commands import events as events_command
from orchestrator.controller import Controller
from orchestrator.event_log import EventLog
from tests.unit.test_controller import LAB, FakeCluster, config, node_of, only_the_desktop_holds, run_ticks
from tests.unit.test_gateway_fakes import FakeController, app_for, asgi_client

SEVEN_B = "deepseek-r1-distill-qwen-7b.gguf"


def log_of(*kinds: str, kept: int = 500) -> EventLog:
    log = EventLog(kept, clock=iter(range(1_000, 2_000)).__next__, first_id=0)
    for kind in kinds:
        log.record(kind, "gemma", "desktop", f"why {kind}")
    return log


# ----------------------------------------------------------------------------- the ring


def test_ids_grow_by_one_and_are_kept_when_the_ring_drops_the_oldest():
    log = log_of(*[f"k{i}" for i in range(7)], kept=5)
    assert [e["id"] for e in log] == [3, 4, 5, 6, 7] and log.last_id == 7
    assert list(log)[0] == {"id": 3, "at": 1002, "kind": "k2", "model": "gemma", "node": "desktop",
                            "reason": "why k2"}


@pytest.mark.parametrize(("since", "limit", "ids"), [
    (None, 500, [1, 2, 3, 4, 5]),  # everything kept
    (None, 2, [4, 5]),  # without since: the latest
    (2, 500, [3, 4, 5]),  # with since: only newer
    (2, 2, [3, 4]),  # ...the oldest of them first, so paging forward misses none
    (5, 500, []),  # nothing new
    (99, 500, [1, 2, 3, 4, 5]),  # an id from before the gateway restarted: from the start
])
def test_since_gives_the_events_after_an_id_oldest_first(since, limit, ids):
    log = log_of("a", "b", "c", "d", "e")
    returned = log.since(since, limit)
    assert [e["id"] for e in returned] == ids
    assert log.next_since(returned) == (ids[-1] if ids else 5)


def test_ids_begin_at_the_start_time_so_a_restarted_log_goes_on_above_the_one_before():
    now = [1_764_500_000.25]
    before = EventLog(clock=lambda: now[0])
    for kind in ("placed", "loaded", "crashed"):
        before.record(kind, "gemma", "desktop", "why")
    assert [e["id"] for e in before] == [1_764_500_000_251, 1_764_500_000_252, 1_764_500_000_253]
    now[0] += 2.0  # the gateway restarts two seconds later and records its first events
    after = EventLog(clock=lambda: now[0])
    for kind in ("placed", "loaded"):
        after.record(kind, "gemma", "desktop", "why")
    seen = before.last_id  # a follower of the run before asks for what is newer
    assert [e["kind"] for e in after.since(seen)] == ["placed", "loaded"]
    assert min(e["id"] for e in after) > seen


def test_a_failing_listener_neither_loses_the_event_nor_stops_the_others():
    log, seen = EventLog(), []
    log.listeners += [lambda e: 1 / 0, seen.append]
    log.record("loaded", "gemma", "desktop", "ready in 1.0 s", seconds=1.0)
    assert [e["kind"] for e in log] == ["loaded"] and seen[0]["seconds"] == 1.0


# ----------------------------------------------------------------------------- the API


@pytest.fixture
def anyio_backend():
    return "asyncio"  # the gateway runs on asyncio (Ray's loop)


@pytest.fixture
def fleet() -> FakeController:
    controller = FakeController()
    controller.events = log_of("placed", "loaded", "idle_unload")
    return controller


async def get(controller, query: str) -> httpx.Response:
    async with asgi_client(app_for(controller)) as client:
        return await client.get(f"/api/events{query}")


@pytest.mark.anyio
async def test_the_events_api_pages_forward_with_since_and_last_id(fleet):
    first = (await get(fleet, "?limit=2")).json()
    assert [e["kind"] for e in first["events"]] == ["loaded", "idle_unload"] and first["last_id"] == 3
    assert set(first["events"][0]) == {"id", "at", "kind", "model", "node", "reason"}
    assert (await get(fleet, f"?since={first['last_id']}")).json() == {"events": [], "last_id": 3}
    fleet.events.record("evicted", "gemma", "desktop", "room for a bigger one")
    newer = (await get(fleet, "?since=3")).json()
    assert [(e["id"], e["kind"]) for e in newer["events"]] == [(4, "evicted")] and newer["last_id"] == 4


@pytest.mark.anyio
@pytest.mark.parametrize(("query", "param"), [("?limit=0", "limit"), ("?limit=501", "limit"),
                                              ("?since=-1", "since"), ("?since=soon", "since"),
                                              ("?sinse=3", "sinse")])
async def test_a_bad_or_unknown_events_parameter_is_a_400_naming_it(fleet, query, param):
    response = await get(fleet, query)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_the_cluster_view_carries_event_ids():
    controller = Controller(config([{"name": "r1", "path": SEVEN_B}]), FakeCluster(LAB))
    controller.record_event("loaded", "r1", "desktop", "r1#0 ready in 2.0 s", seconds=2.0)
    assert [(e.id, e.kind) for e in controller.view().events] == [(controller.events.last_id, "loaded")]


# ----------------------------------------------------------------------------- the CLI


def args(**given) -> argparse.Namespace:
    return argparse.Namespace(**{"url": "http://gw", "follow": False, "limit": 50, "interval": 0.0, "json": False,
                                 "api_key": None, **given})


def transport_for(log: EventLog, asked: list[dict] | None = None) -> httpx.MockTransport:
    """The gateway's answer, from a real EventLog (the same paging rule as the API)."""
    def handle(request: httpx.Request) -> httpx.Response:
        query = {k: v[0] for k, v in parse_qs(urlparse(str(request.url)).query).items()}
        (asked if asked is not None else []).append(query)
        since = int(query["since"]) if "since" in query else None
        returned = log.since(since, int(query.get("limit", 100)))
        return httpx.Response(200, json={"events": returned, "last_id": log.next_since(returned)})
    return httpx.MockTransport(handle)


def test_an_event_prints_as_one_line_with_time_kind_model_node_and_why():
    line = events_command.format_event({"id": 1, "at": 0.0, "kind": "node_gone", "model": "*", "node": "laptop-1",
                                        "reason": "laptop-1 (10.0.0.2) left the cluster: Ray reports it dead"})
    assert "\n" not in line
    when, kind, model, node, why = _fields(line)
    assert (kind, model, node) == ("node_gone", "*", "laptop-1")
    assert why == "laptop-1 (10.0.0.2) left the cluster: Ray reports it dead"
    assert when.count(":") == 2


def _fields(line: str) -> tuple[str, ...]:
    date, time_, kind, model, node, why = line.split(None, 5)
    return time_, kind, model, node, why


def test_events_prints_the_latest_oldest_first():
    out = io.StringIO()
    assert events_command.run(args(limit=2), transport=transport_for(log_of("placed", "copied", "loaded")),
                              out=out) == 0
    assert [_fields(line)[1] for line in out.getvalue().splitlines()] == ["copied", "loaded"]


def test_events_follow_prints_new_ones_as_they_come_until_ctrl_c():
    log, asked, out = log_of("placed"), [], io.StringIO()
    naps = iter([lambda: log.record("loaded", "gemma", "desktop", "ready"), lambda: None,
                 lambda: log.record("evicted", "gemma", "desktop", "room"), None])

    def sleep(_seconds: float) -> None:
        step = next(naps)
        if step is None:
            raise KeyboardInterrupt
        step()

    assert events_command.run(args(follow=True, json=True), transport=transport_for(log, asked), sleep=sleep,
                              out=out) == 0
    printed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["id"], e["kind"]) for e in printed] == [(1, "placed"), (2, "loaded"), (3, "evicted")]
    assert [q.get("since") for q in asked] == [None, "1", "1", "2", "2"]  # each poll from the last id seen


def test_events_says_why_when_no_gateway_answers(capsys):
    assert events_command.run(args(url="http://127.0.0.1:1")) == 1
    assert "no homefleet gateway at http://127.0.0.1:1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- where they are recorded


def kinds(controller: Controller, kind: str) -> list[dict]:
    return [e for e in controller.events if e["kind"] == kind]


def test_a_placement_is_an_event_that_says_where_and_how():
    controller = Controller(config([{"name": "r1", "path": SEVEN_B}]), FakeCluster(LAB))
    run_ticks(controller)
    [placed] = kinds(controller, "placed")
    node = node_of(controller, "r1")
    assert placed["node"] == node and placed["reason"].startswith(f"r1#0 on {node}: ")
    assert "the node holds its file" in placed["reason"]
    assert [e["kind"] for e in controller.events if e["model"] == "r1"][:2] == ["placed", "loaded"]


def test_a_finished_copy_is_an_event_with_its_bytes_and_seconds():
    cluster = only_the_desktop_holds(SEVEN_B)
    controller = Controller(config([{"name": "r1", "path": SEVEN_B}]), cluster)
    run_ticks(controller)
    (transfer_id, (node, _, progress)), = cluster.transfers.items()
    assert "its file is copied there first" in kinds(controller, "placed")[0]["reason"]
    progress["total_bytes"] = 4 << 30
    cluster.finish(transfer_id)
    run_ticks(controller, 2)
    [copied] = kinds(controller, "copied")
    assert (copied["model"], copied["node"], copied["bytes"], copied["method"]) == ("r1", node, 4 << 30, "copy")
    assert copied["seconds"] >= 0 and f"copied to {node} from desktop: 4.0 GiB in" in copied["reason"]


def test_a_node_that_leaves_is_one_node_gone_event_naming_what_it_ran():
    cluster = FakeCluster(LAB)
    controller = Controller(config([{"name": "r1", "path": SEVEN_B}]), cluster)
    run_ticks(controller)
    first = node_of(controller, "r1")
    cluster.alive[first] = False
    run_ticks(controller)
    [gone] = kinds(controller, "node_gone")
    assert gone["node"] == first and "left the cluster" in gone["reason"]
    assert "r1#0 will be placed again" in gone["reason"]


def test_a_load_carries_its_seconds_for_the_load_histogram():
    class TimedCluster(FakeCluster):
        async def load(self, handle: str, timeout_s: float) -> dict:
            return {**await super().load(handle, timeout_s), "load_seconds": 2.5}

    controller = Controller(config([{"name": "r1", "path": SEVEN_B}]), TimedCluster(LAB))
    run_ticks(controller)
    [loaded] = kinds(controller, "loaded")
    assert loaded["seconds"] == 2.5 and loaded["reason"] == "r1#0 ready in 2.5 s"
