"""`homefleet status`: the text tables (render_status) and the thin command around them."""

from __future__ import annotations

import argparse
import http.server
import json
import re
import socket
import threading
from contextlib import contextmanager

import httpx
import pytest

from orchestrator.cluster_view import ClusterView, ModelView, NodeView, ReplicaView
from orchestrator.commands import status as status_command
from orchestrator.core.hardware import GIB, MIB, GpuInfo, NodeHardware
from orchestrator.core.store_types import StoreReport, TransferProgress
from orchestrator.status_report import render_status, short_gpu_name

NOW = 1_700_000_000.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")


# ----------------------------------------------------------------------------- factories


def gpu(name="NVIDIA GeForce RTX 4070 Ti", total_gib=16, used_gib=None, util=None, index=0) -> GpuInfo:
    used = None if used_gib is None else int(used_gib * GIB)
    free = None if used is None else int(total_gib * GIB) - used
    return GpuInfo(
        index=index, name=name, vram_total_bytes=int(total_gib * GIB), vram_used_bytes=used,
        vram_free_bytes=free, utilization_pct=util,
    )


def node(name="desktop", state="alive", gpus=None, ram_gib=64, ram_free_gib=None, cpu_pct=None,
         is_head=False, reported_ago=1.0, cores=14, store=None) -> NodeView:
    hardware = NodeHardware(
        name=name, cpu_cores=cores, cpu_threads=cores, cpu_utilization_pct=cpu_pct,
        ram_total_bytes=int(ram_gib * GIB),
        ram_available_bytes=None if ram_free_gib is None else int(ram_free_gib * GIB),
        gpus=gpus if gpus is not None else [gpu()],
    )
    return NodeView(name=name, address=f"192.168.1.{len(name)}", state=state, is_head=is_head,
                    hardware=hardware, reported_at=NOW - reported_ago, store=store)


def store(free_bytes=None, total_bytes=None) -> StoreReport:
    return StoreReport(models_dir="/srv/models", disk_free_bytes=free_bytes, disk_total_bytes=total_bytes)


HF_URL = ("https://huggingface.co/Qwen/Qwen2.5-Coder-14B-Instruct-GGUF/resolve/main/"
          "qwen2.5-coder-14b-instruct-q4_k_m.gguf")


def transfer(state="copying", source="desktop", done=int(108.5 * MIB), total=241 * MIB, rate=64 * MIB, eta=2.1,
             attempt=1) -> TransferProgress:
    return TransferProgress(
        transfer_id="t-1", name="model.gguf", state=state, kind="download" if source.startswith("http") else "copy",
        source=source, bytes_done=done, total_bytes=total, rate_bytes_per_s=rate, eta_s=eta, attempt=attempt,
    )


def replica(model="qwen-14b", node_name="desktop", state="ready", gpu_layers=49, total_layers=49,
            reason=None, est_gpu=None, est_ram=None, meas_gpu=None, meas_ram=None, suffix="0",
            transfer=None) -> ReplicaView:
    return ReplicaView(
        replica_id=f"{model}-{suffix}", node=node_name, state=state, reason=reason, transfer=transfer,
        gpu_layers=gpu_layers, total_layers=total_layers,
        estimated_gpu_bytes=est_gpu, estimated_ram_bytes=est_ram,
        measured_gpu_bytes=meas_gpu, measured_ram_bytes=meas_ram,
    )


def model(name="qwen-14b", replicas=None, state=None, reason=None) -> ModelView:
    replicas = replicas if replicas is not None else [replica(model=name)]
    state = state or (replicas[0].state if replicas else "pending")
    return ModelView(name=name, context=8192, state=state, reason=reason, replicas=replicas)


def view(nodes=None, models=None) -> ClusterView:
    return ClusterView(nodes=nodes if nodes is not None else [node()], models=models or [], generated_at=NOW)


def section(text: str, title: str) -> list[str]:
    """Lines of one table (NODES or MODELS), header first, without the title."""
    block = next(b for b in text.split("\n\n") if b.startswith(title))
    return block.splitlines()[1:]


def row_of(lines: list[str], first_cell: str) -> str:
    return next(line for line in lines if line.startswith(first_cell))


def cell(lines: list[str], header: str, first_cell: str) -> str:
    """The text of one column in the row starting with first_cell (columns found from the header)."""
    head = lines[0]
    start = head.index(header)
    following = [m.start() for m in re.finditer(r"(?<=  )\S", head) if m.start() > start]
    end = following[0] if following else None
    return row_of(lines, first_cell)[start:end].strip()


def flat(text: str) -> str:
    return " ".join(text.split())


def notes_under(lines: list[str], first_cell: str) -> list[str]:
    """The indented note lines right under the row starting with first_cell."""
    after = lines[lines.index(row_of(lines, first_cell)) + 1:]
    notes = []
    for line in after:
        if not line.startswith("    "):
            break
        notes.append(line)
    return notes


# ----------------------------------------------------------------------------- nodes


def test_gone_node_is_shown_as_gone_with_when_it_was_last_seen():
    text = render_status(view([node("desktop"), node("laptop-2", state="gone", reported_ago=754)]))
    lines = section(text, "NODES")
    assert cell(lines, "STATE", "laptop-2") == "gone"
    assert "seen 12m ago" in text
    assert "(1 alive, 1 gone)" in text


def test_gone_node_hides_stale_live_use_but_keeps_capacity():
    gone = node("laptop-2", state="gone", gpus=[gpu("NVIDIA GeForce GTX 1060", 6, used_gib=1, util=50)],
                ram_gib=40, ram_free_gib=30, cpu_pct=12)
    lines = section(render_status(view([gone])), "NODES")
    assert cell(lines, "RAM", "laptop-2") == "-/40.0 GiB"
    assert cell(lines, "GPU", "laptop-2") == "GTX 1060 -/6.0 GiB"
    assert cell(lines, "CPU", "laptop-2") == "14 cores"


@pytest.mark.parametrize(
    ("column", "expected"),
    [
        ("CPU", "14 cores 23%"),
        ("RAM", "12.0/64.0 GiB"),
        ("GPU", "RTX 4070 Ti 3.1/16.0 GiB 87%"),
        ("ADDRESS", "192.168.1.7"),
    ],
)
def test_alive_node_shows_hardware_and_live_use(column, expected):
    alive = node("desktop", gpus=[gpu(used_gib=3.1, util=87)], ram_free_gib=52, cpu_pct=23.4)
    assert cell(section(render_status(view([alive])), "NODES"), column, "desktop") == expected


def test_vram_used_comes_from_free_when_used_is_not_reported():
    card = GpuInfo(name="NVIDIA GeForce GTX 1660 Ti", vram_total_bytes=6 * GIB, vram_free_bytes=2 * GIB)
    lines = section(render_status(view([node("laptop-1", gpus=[card])])), "NODES")
    assert cell(lines, "GPU", "laptop-1") == "GTX 1660 Ti 4.0/6.0 GiB"


def test_every_gpu_of_a_node_gets_its_own_line():
    two = node("rig", gpus=[gpu("NVIDIA GeForce RTX 3090", 24, used_gib=1, index=0),
                            gpu("NVIDIA GeForce RTX 3060", 12, used_gib=2, index=1)])
    text = render_status(view([two]))
    assert "RTX 3090 1.0/24.0 GiB" in text and "RTX 3060 2.0/12.0 GiB" in text
    line_3090 = next(line for line in text.splitlines() if "RTX 3090" in line)
    line_3060 = next(line for line in text.splitlines() if "RTX 3060" in line)
    assert line_3090.startswith("rig") and not line_3060.startswith("rig")
    assert line_3090.index("RTX 3090") == line_3060.index("RTX 3060")


def test_node_without_gpu_says_none():
    assert cell(section(render_status(view([node("nas", gpus=[])])), "NODES"), "GPU", "nas") == "none"


def test_head_node_is_marked_and_listed_first():
    lines = section(render_status(view([node("laptop-1"), node("desktop", is_head=True)])), "NODES")
    assert lines[1].startswith("desktop (head)")


def test_node_lists_the_models_it_holds_but_not_failed_ones():
    models = [
        model("qwen-14b", [replica("qwen-14b", "desktop")]),
        model("llama-3b", [replica("llama-3b", "desktop", state="loading")]),
        model("mistral-7b", [replica("mistral-7b", "desktop", state="failed", reason="out of memory")]),
        model("phi-3", [replica("phi-3", "laptop-1")]),
    ]
    text = render_status(view([node("desktop"), node("laptop-1")], models))
    nodes_block = "\n".join(section(text, "NODES"))
    desktop_models = [line.split("  ")[-1].strip() for line in nodes_block.splitlines()[1:3]]
    assert desktop_models == ["qwen-14b", "llama-3b (loading)"]
    assert "mistral-7b" not in nodes_block
    assert cell(section(text, "NODES"), "MODELS", "laptop-1") == "phi-3"


@pytest.mark.parametrize(
    ("the_node", "expected"),
    [
        (node("desktop", store=store(int(812.3 * GIB), 931 * GIB)), "812.3 GiB"),
        (node("desktop", store=store(512 * MIB)), "512 MiB"),
        (node("desktop", store=None), "-"),
        (node("desktop", store=store(None)), "-"),
        (node("desktop", state="gone", store=store(812 * GIB)), "-"),
    ],
    ids=["free", "small", "no-store-report", "free-unknown", "gone-hides-stale-free"],
)
def test_disk_column_shows_the_free_disk_of_the_node_store_or_a_dash(the_node, expected):
    assert cell(section(render_status(view([the_node])), "NODES"), "DISK FREE", "desktop") == expected


def test_disk_figure_is_per_node():
    nodes = [node("desktop", store=store(812 * GIB)), node("laptop-1", store=store(120 * GIB)), node("laptop-2")]
    lines = section(render_status(view(nodes)), "NODES")
    assert [cell(lines, "DISK FREE", n) for n in ("desktop", "laptop-1", "laptop-2")] == ["812.0 GiB", "120.0 GiB", "-"]


def test_node_lists_a_model_whose_file_is_coming_to_it():
    m = model("gemma", [replica("gemma", "laptop-1", state="copying", transfer=transfer())])
    lines = section(render_status(view([node("laptop-1")], [m])), "NODES")
    assert cell(lines, "MODELS", "laptop-1") == "gemma (copying)"


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    ("gpu_layers", "total_layers", "state", "expected"),
    [
        (49, 49, "ready", "100% GPU"),
        (15, 29, "ready", "48%/52% CPU/GPU"),
        (0, 33, "ready", "100% CPU"),
        (20, 40, "loading", "50%/50% CPU/GPU"),
        (49, 49, "failed", "-"),
        (49, 49, "pending", "-"),
    ],
)
def test_processor_column_shows_the_gpu_cpu_split_like_ollama_ps(gpu_layers, total_layers, state, expected):
    m = model("qwen-14b", [replica(gpu_layers=gpu_layers, total_layers=total_layers, state=state)])
    assert cell(section(render_status(view(models=[m])), "MODELS"), "PROCESSOR", "qwen-14b") == expected


@pytest.mark.parametrize(
    ("column", "gpu_bytes", "ram_bytes", "expected"),
    [
        ("EST. MEM", 9 * GIB, GIB, "10.0 GiB"),
        ("EST. MEM", None, 512 * MIB, "512 MiB"),
        ("EST. MEM", None, None, "-"),
        ("MEASURED", 5 * GIB, 3 * GIB, "8.0 GiB"),
        ("MEASURED", None, None, "-"),
    ],
)
def test_memory_columns_show_vram_plus_ram(column, gpu_bytes, ram_bytes, expected):
    if column == "EST. MEM":
        r = replica(est_gpu=gpu_bytes, est_ram=ram_bytes)
    else:
        r = replica(meas_gpu=gpu_bytes, meas_ram=ram_bytes)
    assert cell(section(render_status(view(models=[model("qwen-14b", [r])])), "MODELS"), column, "qwen-14b") == expected


def test_failed_replica_shows_its_reason_in_full_under_the_row():
    reason = (
        "llama.cpp failed to load mistral-7b-instruct-v0.2.Q4_K_M.gguf: out of memory allocating "
        "KV cache (4.0 GiB) on CUDA0 with 3.1 GiB free; will retry in 60 s"
    )
    m = model("mistral-7b", [replica("mistral-7b", "laptop-2", state="failed", reason=reason)])
    lines = section(render_status(view(models=[m]), width=80), "MODELS")
    assert cell(lines, "STATE", "mistral-7b") == "failed"
    under = lines[lines.index(row_of(lines, "mistral-7b")) + 1:]
    assert under[0].lstrip().startswith("reason: ")
    assert reason in flat(" ".join(under)).removeprefix("reason: ")


def test_pending_model_without_replicas_shows_a_row_and_its_per_node_reasons():
    reason = ("not placed: desktop: needs 19.4 GiB VRAM, 6.3 GiB free; "
              "laptop-1: needs 19.4 GiB VRAM, 0.4 GiB free; laptop-2: node is gone")
    m = model("deepseek-32b", replicas=[], state="pending", reason=reason)
    text = render_status(view(models=[m]), width=70)
    lines = section(text, "MODELS")
    assert cell(lines, "STATE", "deepseek-32b") == "pending"
    assert cell(lines, "NODE", "deepseek-32b") == "-"
    assert reason in flat(text)


def test_reason_wraps_to_the_width_without_cutting_words():
    reason = "laptop-1: needs 9.4 GiB VRAM, 5.1 GiB free; " * 6
    m = model("big", replicas=[], state="pending", reason=reason.strip())
    lines = render_status(view(models=[m]), width=60).splitlines()
    reason_lines = [line for line in lines if line.startswith("    ")]
    assert len(reason_lines) > 1
    assert all(len(line) <= 60 for line in reason_lines)
    assert flat(" ".join(reason_lines)).count("9.4 GiB VRAM") == 6


def test_reason_keeps_its_own_line_breaks():
    m = model("big", replicas=[], state="pending", reason="desktop: needs 20 GiB\nlaptop-1: needs 20 GiB")
    reason_lines = [line for line in render_status(view(models=[m])).splitlines() if line.startswith("    ")]
    assert [line.strip() for line in reason_lines] == ["reason: desktop: needs 20 GiB", "laptop-1: needs 20 GiB"]


def test_ready_model_prints_no_reason_line():
    text = render_status(view(models=[model("qwen-14b")]))
    assert "reason:" not in text


def test_model_level_reason_not_said_by_a_replica_is_printed_once():
    m = model("qwen-14b", [replica(), replica(suffix="1", state="pending", node_name=None, reason="no room")],
              state="ready", reason="1 of 2 replicas placed")
    text = render_status(view(models=[m]))
    assert text.count("no room") == 1 and text.count("1 of 2 replicas placed") == 1


def test_model_with_several_replicas_names_the_model_once_and_shortens_replica_ids():
    m = model("qwen-14b", [replica(suffix="0"), replica(node_name="laptop-1", suffix="1")])
    lines = section(render_status(view(models=[m])), "MODELS")
    assert [line.split()[0] for line in lines[1:3]] == ["qwen-14b", "1"]
    assert cell(lines, "REPLICA", "qwen-14b") == "0"


def test_columns_line_up_with_their_headers():
    models = [model("a", [replica("a", gpu_layers=0)]),
              model("a-much-longer-model-name", [replica("a-much-longer-model-name", "laptop-1", state="loading")])]
    lines = section(render_status(view(models=models)), "MODELS")
    state_at = lines[0].index("STATE")
    assert [line[state_at:].split()[0] for line in lines[1:]] == ["ready", "loading"]


def test_copying_replica_shows_percent_in_its_state_and_rate_eta_and_source_under_its_row():
    m = model("gemma", [replica("gemma", "laptop-1", state="copying", transfer=transfer())])
    lines = section(render_status(view(models=[m])), "MODELS")
    assert cell(lines, "STATE", "gemma") == "copying 45%"
    assert [n.strip() for n in notes_under(lines, "gemma")] == [
        "copying: 45% of 241 MiB at 64 MiB/s, about 2s left, from desktop"
    ]


def test_downloading_replica_names_the_url_in_full_even_when_longer_than_the_width():
    t = transfer(source=HF_URL, done=int(1.1 * GIB), total=int(8.4 * GIB), rate=11.2 * MIB, eta=668)
    m = model("qwen-14b", [replica(state="downloading", transfer=t)])
    lines = section(render_status(view(models=[m]), width=80), "MODELS")
    assert cell(lines, "STATE", "qwen-14b") == "downloading 13%"
    notes = notes_under(lines, "qwen-14b")
    assert flat(" ".join(notes)) == f"downloading: 13% of 8.4 GiB at 11 MiB/s, about 11m left, from {HF_URL}"
    assert any(line.strip() == HF_URL for line in notes)  # on a line of its own, not cut
    assert all(len(line) <= 80 for line in notes if HF_URL not in line)


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (transfer(state="queued", done=0, rate=None, eta=None), "copying: queued, 241 MiB, from desktop"),
        (transfer(state="verifying", done=241 * MIB, rate=None, eta=0),
         "copying: verifying sha256 of 241 MiB, from desktop"),
        (transfer(total=None, eta=None), "copying: 108 MiB so far at 64 MiB/s, from desktop"),
        (transfer(rate=300 * 1024, eta=3600 + 5 * 60),
         "copying: 45% of 241 MiB at 300 KiB/s, about 1h05m left, from desktop"),
        (transfer(attempt=2), "copying: 45% of 241 MiB at 64 MiB/s, about 2s left (attempt 2), from desktop"),
        (transfer(done=int(240.9 * MIB)), "copying: 99% of 241 MiB at 64 MiB/s, about 2s left, from desktop"),
    ],
    ids=["queued", "verifying", "size-unknown", "slow-and-long", "retried", "no-100%-before-the-end"],
)
def test_progress_note_says_where_the_copy_stands(t, expected):
    m = model("gemma", [replica("gemma", "laptop-1", state="copying", transfer=t)])
    lines = section(render_status(view(models=[m])), "MODELS")
    assert flat(" ".join(notes_under(lines, "gemma"))) == expected


def test_model_reason_that_repeats_the_copy_progress_is_not_printed_again():
    controller_reason = "to laptop-1 from desktop: 45% of 241 MiB at 64 MiB/s, about 2 s left"
    m = model("gemma", [replica("gemma", "laptop-1", state="copying", transfer=transfer())],
              state="copying", reason=controller_reason)
    text = render_status(view(models=[m]))
    assert text.count("64 MiB/s") == 1 and "reason:" not in text


def test_copying_replica_without_progress_yet_keeps_the_model_reason():
    m = model("gemma", [replica("gemma", "laptop-1", state="copying")], state="copying", reason="to laptop-1")
    lines = section(render_status(view(models=[m])), "MODELS")
    assert cell(lines, "STATE", "gemma") == "copying"
    assert [n.strip() for n in notes_under(lines, "gemma")] == ["reason: to laptop-1"]


def test_loaded_replica_keeps_its_finished_transfer_quiet():
    done = transfer(state="done", done=241 * MIB, rate=None, eta=0)
    m = model("gemma", [replica("gemma", "laptop-1", state="loading", transfer=done)])
    lines = section(render_status(view(models=[m])), "MODELS")
    assert cell(lines, "STATE", "gemma") == "loading"
    assert notes_under(lines, "gemma") == []


def test_models_title_counts_copying_and_downloading_models():
    models = [model("a", [replica("a", state="copying", transfer=transfer())]),
              model("b", [replica("b", state="downloading", transfer=transfer(source=HF_URL))]),
              model("c")]
    assert render_status(view(models=models)).count("MODELS  (1 ready, 1 copying, 1 downloading)") == 1


@pytest.mark.parametrize("state", ["copying", "downloading"])
def test_file_on_its_way_is_painted_like_loading(state):
    m = model("gemma", [replica("gemma", state=state, transfer=transfer())])
    colored = render_status(view(models=[m]), color=True)
    assert f"\x1b[36m{state} 45%" in colored
    assert f"\x1b[36m    {state}: 45% of 241 MiB" in colored
    assert ANSI.sub("", colored) == render_status(view(models=[m]))


# ----------------------------------------------------------------------------- whole report


def test_empty_cluster_says_what_to_do():
    text = render_status(view(nodes=[], models=[]))
    assert "homefleet join" in text and "models:" in text


def test_plain_output_has_no_escape_codes_and_color_output_paints_states():
    m = model("mistral-7b", [replica("mistral-7b", state="failed", reason="oom")])
    plain = render_status(view(models=[m]))
    colored = render_status(view(models=[m]), color=True)
    assert "\x1b[" not in plain
    assert "\x1b[31mfailed" in colored
    assert ANSI.sub("", colored) == plain


def test_no_line_ends_in_blanks():
    copying = model("gemma", [replica("gemma", "laptop-2", state="copying", transfer=transfer(source=HF_URL))])
    text = render_status(view([node("desktop", store=store(GIB)), node("laptop-2", state="gone")], [model(), copying]),
                         width=60)
    assert all(line == line.rstrip() for line in text.splitlines())


@pytest.mark.parametrize(
    ("marketing_name", "short"),
    [("NVIDIA GeForce RTX 4070 Ti", "RTX 4070 Ti"), ("NVIDIA RTX A4000", "RTX A4000"), ("Tesla T4", "Tesla T4")],
)
def test_gpu_names_drop_the_vendor_prefixes(marketing_name, short):
    assert short_gpu_name(marketing_name) == short


# ----------------------------------------------------------------------------- the command


class _Gateway(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b"{}"
    seen_headers: dict = {}

    def do_GET(self):
        type(self).seen_headers = dict(self.headers)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@contextmanager
def fake_gateway(status: int, body: bytes):
    handler = type("Handler", (_Gateway,), {"status": status, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_args(url: str | None, json_out: bool = False, api_key: str | None = None) -> argparse.Namespace:
    return argparse.Namespace(url=url, json=json_out, api_key=api_key)


SAMPLE = view([node("desktop")], [model("qwen-14b")]).model_dump_json().encode()


def test_status_prints_tables_from_the_gateway(capsys):
    with fake_gateway(200, SAMPLE) as (url, _):
        assert status_command.run(status_args(url)) == 0
    out = capsys.readouterr().out
    assert "NODES" in out and "MODELS" in out and "qwen-14b" in out


def test_status_json_prints_the_gateway_answer(capsys):
    with fake_gateway(200, SAMPLE) as (url, _):
        assert status_command.run(status_args(url, json_out=True)) == 0
    assert ClusterView.model_validate(json.loads(capsys.readouterr().out)).models[0].name == "qwen-14b"


def test_status_sends_the_api_key_as_a_bearer_token(capsys):
    with fake_gateway(200, SAMPLE) as (url, handler):
        assert status_command.run(status_args(url, api_key="s3cret")) == 0
    assert handler.seen_headers.get("Authorization") == "Bearer s3cret"


def test_status_reads_url_and_key_from_the_environment(capsys, monkeypatch):
    with fake_gateway(200, SAMPLE) as (url, handler):
        monkeypatch.setenv("HOMEFLEET_URL", url)
        monkeypatch.setenv("HOMEFLEET_API_KEY", "from-env")
        assert status_command.run(status_args(None)) == 0
    assert handler.seen_headers.get("Authorization") == "Bearer from-env"


def test_status_without_a_gateway_says_how_to_start_one_and_exits_1(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert status_command.run(status_args(url)) == 1
    err = capsys.readouterr().err
    assert f"no homefleet gateway at {url}: start one with `homefleet up`" in err


@pytest.mark.parametrize(
    ("http_status", "body", "message"),
    [
        (401, b'{"error": {"message": "missing API key"}}', "--api-key"),
        (500, b'{"error": {"message": "controller not started", "type": "server_error"}}', "controller not started"),
        (200, b"<html>not us</html>", "did not answer with JSON"),
        (200, b'{"nodes": "many"}', "did not answer with a cluster view"),
    ],
)
def test_status_explains_a_bad_answer_and_exits_1(capsys, http_status, body, message):
    with fake_gateway(http_status, body) as (url, _):
        assert status_command.run(status_args(url)) == 1
    assert message in capsys.readouterr().err


def test_fetch_cluster_accepts_an_injected_transport():
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=SAMPLE))
    payload = status_command.fetch_cluster("http://gateway:8000", None, transport=transport)
    assert payload["models"][0]["name"] == "qwen-14b"


def test_status_subcommand_is_registered_with_its_flags():
    parser = argparse.ArgumentParser()
    status_command.register(parser.add_subparsers())
    args = parser.parse_args(["status", "--url", "http://h:8000", "--json", "--api-key", "k"])
    assert (args.url, args.json, args.api_key, args.func) == ("http://h:8000", True, "k", status_command.run)
