"""Wake-on-LAN: the magic packet and MAC spelling (pure, by tables); which sleeping machine
the head wakes for a model no live node can hold, and a request that waits for it, against
the fake cluster of test_controller (Ray and the network replaced, the logic real)."""

from __future__ import annotations

import asyncio

import pytest

from orchestrator.controller import Controller
from orchestrator.core.wake_on_lan import broadcast_targets, format_mac, magic_packet, parse_mac
from tests.unit.test_controller import config
from tests.unit.test_residency import RejoiningCluster
from worker.errors import RequestError

MAC = "3c:7c:3f:1a:2b:4d"
SEVENTY_B = {"name": "big", "path": "deepseek-r1-distill-llama-70b.gguf", "context": 8192, "parallel": 1,
             "load": "on_demand"}  # ~44 GiB: a split on the desktop or laptop-1, nowhere on laptop-2


# ----------------------------------------------------------------------------- the pure part


def test_the_magic_packet_is_six_0xff_then_the_mac_sixteen_times():
    packet = magic_packet(MAC)
    assert len(packet) == 102
    assert packet == b"\xff" * 6 + bytes.fromhex("3c7c3f1a2b4d") * 16


@pytest.mark.parametrize("text", ["3c:7c:3f:1a:2b:4d", "3C-7C-3F-1A-2B-4D", "3c7c.3f1a.2b4d", "3c7c3f1a2b4d",
                                  " 3c:7c:3f:1a:2b:4d\n"])
def test_every_usual_mac_spelling_is_read_and_shown_one_way(text):
    assert parse_mac(text) == bytes.fromhex("3c7c3f1a2b4d")
    assert format_mac(text) == MAC


@pytest.mark.parametrize(("text", "why"), [
    ("3c:7c:3f:1a:2b", "not a MAC"), ("3c:7c-3f:1a:2b:4d", "not a MAC"), ("zz:7c:3f:1a:2b:4d", "not a MAC"),
    ("00:00:00:00:00:00", "all zeros"), ("ff:ff:ff:ff:ff:ff", "multicast or broadcast"),
    ("01:00:5e:00:00:01", "multicast or broadcast"),
])
def test_a_mac_no_card_can_be_woken_at_is_refused_with_the_reason(text, why):
    with pytest.raises(ValueError, match=why):
        parse_mac(text)


@pytest.mark.parametrize(("address", "local", "expected"), [
    ("192.168.1.21", ["127.0.0.1/255.0.0.0", "192.168.1.10/255.255.255.0"], ["192.168.1.255", "255.255.255.255"]),
    ("10.1.7.3", ["10.1.0.2/16"], ["10.1.255.255", "255.255.255.255"]),  # the head's own network, its mask
    ("192.168.7.21", ["192.168.1.10/24"], ["192.168.7.255", "255.255.255.255"]),  # another network: a /24 guess
    ("127.0.0.3", ["127.0.0.1/8"], ["255.255.255.255"]),  # loopback has no broadcast
    (None, [], ["255.255.255.255"]),
    ("not-an-ip", [], ["255.255.255.255"]),
])
def test_the_packet_goes_to_the_sleepers_network_broadcast_and_to_everyone(address, local, expected):
    assert broadcast_targets(address, local) == expected


# ----------------------------------------------------------------------------- the controller's part


class SleepyCluster(RejoiningCluster):
    """Machines that sleep (gone) and wake (a new Ray node under the old name); their agents
    report the MACs in `macs`."""

    def __init__(self, names: list[str], macs: dict[str, str]) -> None:
        super().__init__(names)
        self.macs = macs

    async def report(self, agent: str, model_paths: dict, timeout_s: float) -> dict:
        report = await super().report(agent, model_paths, timeout_s)
        report["mac"] = self.macs.get(agent)
        return report


async def ticks(controller: Controller, n: int = 3) -> None:
    """Ticks, each followed by a round of every waiting request (in `up` a round comes at
    least once a second)."""
    for _ in range(n):
        await controller.tick()
        controller.states_changed()
        for _ in range(3):
            await asyncio.sleep(0)


def fleet(macs: dict[str, str], models: list[dict], **cluster) -> tuple[SleepyCluster, Controller, list]:
    cluster_ = SleepyCluster(["laptop-2", "desktop", "laptop-1"], macs)
    controller = Controller(config(models, **cluster), cluster_)
    sent: list[tuple[str, str]] = []

    def sender(mac: str, address: str) -> list[str]:
        sent.append((mac, address))
        return ["10.0.0.255", "255.255.255.255"]

    controller.wake_sender = sender
    return cluster_, controller, sent


async def asleep(controller: Controller, cluster: SleepyCluster, *names: str) -> None:
    await ticks(controller)  # every machine reports (hardware, MAC) once
    for name in names:
        cluster.alive[name] = False
    await ticks(controller, 2)


@pytest.mark.parametrize(("macs", "woken"), [
    ({"desktop": "aa:00:00:00:00:01", "laptop-1": "aa:00:00:00:00:02"}, "desktop"),  # the rules: most GPU layers
    ({"laptop-1": "aa:00:00:00:00:02"}, "laptop-1"),  # only a machine with a MAC can be woken
])
def test_the_sleeper_woken_is_the_one_the_placement_rules_pick_among_those_with_a_mac(macs, woken):
    cluster, controller, sent = fleet(macs, [SEVENTY_B])

    async def scenario():
        await asleep(controller, cluster, "desktop", "laptop-1")
        waiter = asyncio.create_task(controller.wait_until_ready("big", 30))
        await ticks(controller, 3)
        state = controller.load_progress("big")
        waiter.cancel()
        return state

    state, _, reason = asyncio.run(scenario())
    assert sent == [(macs[woken], "10.0.0.1")]  # its MAC, at the address it was last seen at
    assert state == "waking" and reason.startswith(f"sent Wake-on-LAN to {woken} at 10.0.0.1 ({macs[woken]})")
    assert [e["node"] for e in controller.events if e["kind"] == "waking"] == [woken]


def test_a_request_waits_for_the_woken_machine_and_is_served_once_it_is_back():
    cluster, controller, sent = fleet({"laptop-1": MAC}, [SEVENTY_B])

    async def scenario():
        await asleep(controller, cluster, "desktop", "laptop-1")
        assert controller.waits_for_load("big")
        waiter = asyncio.create_task(controller.wait_until_ready("big", 30))
        await ticks(controller, 3)
        assert not waiter.done()
        view = {m.name: (m.state, m.reason) for m in controller.view().models}
        assert view["big"][0] == "waking" and "sent Wake-on-LAN to laptop-1" in view["big"][1]
        cluster.wake("laptop-1")  # the machine wakes: a new Ray node under its name
        for _ in range(10):
            await ticks(controller, 1)
            if waiter.done():
                break
        await asyncio.wait_for(waiter, 1)
        await ticks(controller, 1)

    asyncio.run(scenario())
    assert controller.ready_replicas("big")[0].node_name == "laptop-1"
    assert len(sent) == 1
    assert [e["kind"] for e in controller.events if e["kind"] in ("waking", "woke", "loaded")] == \
        ["waking", "woke", "loaded"]
    assert not controller.wake_attempts


def test_a_load_always_model_of_a_sleeping_machine_waits_for_it_too():
    cluster, controller, sent = fleet({"laptop-1": MAC}, [{"name": "pinned", "path": "deepseek-r1-distill-qwen-7b.gguf",
                                                          "context": 4096, "node": "laptop-1"}])

    async def scenario():
        await asleep(controller, cluster, "laptop-1")
        assert controller.model_state("pinned")[0] == "pending"
        return controller.waits_for_load("pinned")

    assert asyncio.run(scenario()) is True  # not a 503 at once: the machine can be woken for it
    assert sent == []  # only a request sends the packet


def test_a_machine_that_does_not_wake_in_time_is_a_503_that_says_so():
    cluster, controller, sent = fleet({"laptop-1": MAC}, [SEVENTY_B], wake_timeout_s=0.05)

    async def scenario():
        await asleep(controller, cluster, "desktop", "laptop-1")
        waiter = asyncio.create_task(controller.wait_until_ready("big", 30))
        await ticks(controller, 2)
        await asyncio.sleep(0.1)
        for _ in range(5):
            await ticks(controller, 1)
            await asyncio.sleep(0.01)
            if waiter.done():
                break
        with pytest.raises(RequestError) as error:
            await asyncio.wait_for(waiter, 2)
        return error.value

    error = asyncio.run(scenario())
    assert error.status == 503 and error.code == "node_not_woken"
    assert "laptop-1, which did not wake within 0.05 s (cluster.wake_timeout_s)" in error.message


def test_no_machine_is_woken_for_a_model_a_live_node_can_hold():
    cluster, controller, sent = fleet({"laptop-1": MAC, "desktop": "aa:00:00:00:00:01"},
                                      [dict(SEVENTY_B, path="deepseek-r1-distill-qwen-7b.gguf", context=4096)])

    async def scenario():
        await asleep(controller, cluster, "laptop-1")
        await asyncio.wait_for(asyncio.gather(controller.wait_until_ready("big", 30), ticks(controller, 4)), 5)

    asyncio.run(scenario())
    assert sent == [] and controller.ready_replicas("big")


def test_a_sleeping_machines_mac_and_state_show_in_the_cluster_view():
    cluster, controller, _ = fleet({"laptop-1": MAC}, [])

    async def scenario():
        await asleep(controller, cluster, "laptop-1")

    asyncio.run(scenario())
    nodes = {n.name: n for n in controller.view().nodes}
    assert nodes["laptop-1"].state == "gone" and nodes["laptop-1"].wake_mac == MAC
    assert nodes["laptop-2"].wake_mac is None
