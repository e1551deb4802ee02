"""The dashboard page (`GET /`), its plan endpoint (`GET /api/plan`) and `homefleet status --watch`.

The page's own <script> runs unchanged in a small stand-in for the browser (a DOM of plain
objects, a `fetch` that answers successive `/api/cluster` bodies and, as a test says,
`/api/events`, `/api/plan/choices` and `/api/plan`); the test reads the HTML it rendered.
Without `node` on PATH those tests are skipped; the field-name check still runs. The plan
endpoint runs in the real app over the gateway's fake controller; `status --watch` as a
real process, on a pipe and on a pseudo-terminal. The real browser: tests/integration/
test_dashboard_browser.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import io
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from importlib import resources

import httpx
import pytest
import uvicorn

from orchestrator.cli import main
from orchestrator.cluster_view import ClusterView, ModelView, NodeView, ReplicaView
from orchestrator.commands import status as status_command
from orchestrator.commands.status import watch
from orchestrator.core.hardware import GIB, MIB, GpuInfo, NodeHardware
from orchestrator.core.store_types import StoredFile, StoreReport, TransferProgress
from orchestrator.fit import NodeFit
from orchestrator.gateway.plan_api import PlanAnswer, PlanChoices
from orchestrator.status_report import watch_frame
from tests.unit.test_gateway_fakes import FakeController, app_for, asgi_client

NOW = 1_700_000_000.0
HF_URL = ("https://huggingface.co/Qwen/Qwen2.5-Coder-14B-Instruct-GGUF/resolve/main/"
          "qwen2.5-coder-14b-instruct-q4_k_m.gguf")
NODE = shutil.which("node") or shutil.which("nodejs")
needs_node = pytest.mark.skipif(NODE is None, reason="node (Node.js) is not installed: the page's script cannot be run")


def page() -> str:
    return resources.files("orchestrator.gateway").joinpath("dashboard.html").read_text()


def page_script() -> str:
    scripts = re.findall(r"<script>(.*?)</script>", page(), flags=re.S)
    assert len(scripts) == 1, "the dashboard has one inline script"
    return scripts[0]


# ----------------------------------------------------------------------------- factories


def node(name="desktop", state="alive", store=None, transfers=()) -> NodeView:
    hardware = NodeHardware(
        name=name, cpu_cores=14, cpu_threads=20, cpu_utilization_pct=12, ram_total_bytes=64 * GIB,
        ram_available_bytes=52 * GIB,
        gpus=[GpuInfo(name="NVIDIA GeForce RTX 4070 Ti", vram_total_bytes=16 * GIB, vram_used_bytes=3 * GIB)],
    )
    return NodeView(name=name, address="192.168.1.10", state=state, hardware=hardware, reported_at=NOW - 1,
                    store=store, transfers=list(transfers))


def store(free_bytes=int(812.3 * GIB), total_bytes=931 * GIB, files=3) -> StoreReport:
    return StoreReport(
        models_dir="/srv/models", disk_free_bytes=free_bytes, disk_total_bytes=total_bytes,
        files=[StoredFile(name=f"m{i}.gguf", path=f"/srv/models/m{i}.gguf", size_bytes=MIB, sha256="ab" * 32)
               for i in range(files)],
    )


def transfer(state="copying", source="desktop", done=109 * MIB, total=241 * MIB, rate=64 * MIB,
             eta=2.1) -> TransferProgress:
    return TransferProgress(
        transfer_id="t-1", name="gemma.gguf", state=state, kind="download" if source.startswith("http") else "copy",
        source=source, bytes_done=done, total_bytes=total, rate_bytes_per_s=rate, eta_s=eta,
    )


def model(name="gemma", state="copying", transfer_=None, reason=None, node_name="laptop-1") -> ModelView:
    r = ReplicaView(replica_id=f"{name}-0", node=node_name, state=state, gpu_layers=19, total_layers=19,
                    transfer=transfer_)
    return ModelView(name=name, context=8192, state=state, reason=reason, replicas=[r])


def view_json(nodes, models) -> dict:
    return json.loads(ClusterView(nodes=nodes, models=models, generated_at=NOW).model_dump_json())


# ----------------------------------------------------------------------------- the browser stand-in

# A DOM of plain objects: just what the page's script uses. `html` serializes an element.
HARNESS = r"""
"use strict";
const fs = require("fs");
const script = fs.readFileSync(process.argv[2], "utf8");
const server = JSON.parse(fs.readFileSync(process.argv[3], "utf8"));
const esc = (s) => String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
class Node {}
class Text extends Node {
  constructor(text) { super(); this.data = String(text); }
  get textContent() { return this.data; }
  html() { return esc(this.data); }
}
class Element extends Node {
  constructor(tag) {
    super(); this.tag = tag; this.attrs = {}; this.children = []; this.className = ""; this.style = { cssText: "" };
    this.dataset = {}; this.value = ""; this.listeners = {};
    const el = this;
    this.classList = {
      toggle(name, on) {
        const names = new Set(el.className.split(/\s+/).filter(Boolean));
        if (on === undefined ? !names.has(name) : on) names.add(name); else names.delete(name);
        el.className = [...names].join(" ");
      },
    };
  }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  append(...nodes) {
    for (const n of nodes) {
      if (!(n instanceof Node)) throw new TypeError(`append() got ${n === null ? "null" : typeof n}, not a node`);
      this.children.push(n);
    }
  }
  replaceChildren(...nodes) { this.children = []; this.append(...nodes); }
  addEventListener(kind, fn) { this.listeners[kind] = fn; }
  get textContent() { return this.children.map((c) => c.textContent).join(""); }
  set textContent(text) { this.children = [new Text(text)]; }
  html() {
    const attrs = { ...this.attrs };
    if (this.className) attrs.class = this.className;
    if (this.style.cssText) attrs.style = this.style.cssText;
    const a = Object.entries(attrs).map(([k, v]) => ` ${k}="${esc(v)}"`).join("");
    return `<${this.tag}${a}>${this.children.map((c) => c.html()).join("")}</${this.tag}>`;
  }
}
// The page tells its status line after every poll, rendered or not: that is when to read it.
let polls = 0, pollDone = () => {};
class StatusLine extends Element {
  get textContent() { return super.textContent; }
  set textContent(text) { super.textContent = text; polls += 1; pollDone(); }
}
const byId = { updated: new StatusLine("div") };
const document = {
  body: new Element("body"),
  createElement: (tag) => new Element(tag),
  createTextNode: (text) => new Text(text),
  getElementById: (id) => (byId[id] ||= new Element("div")),
  addEventListener() {},
};
const location = { origin: "http://127.0.0.1:8000", hostname: "127.0.0.1", search: server.search || "" };
const localStorage = { getItem: () => null, setItem() {}, removeItem() {} };
// The gateway: /api/cluster answers the next view of `clusters` (the last one again at the end);
// the others answer what the test gave, or 404 (a head without that endpoint).
const asked = [];
let clusterIndex = 0;
const answer = (a) => a ? { status: a.status, ok: a.status < 300, text: async () => JSON.stringify(a.body) }
                        : { status: 404, ok: false, text: async () => JSON.stringify({ error: { message: "Unknown URL" } }) };
const fetch = async (url) => {
  asked.push(url);
  if (url === "/api/cluster") {
    const body = server.clusters[Math.min(clusterIndex++, server.clusters.length - 1)];
    return answer({ status: 200, body });
  }
  if (url.startsWith("/api/events")) return answer(server.events.shift());
  if (url === "/api/plan/choices") return answer(server.choices);
  if (url.startsWith("/api/plan?")) return answer(server.plan);
  return answer(null);
};
// Only the poll timer (POLL_MS: poll_ms) is kept: the harness runs the next poll itself.
let nextPoll = null;
const timers = [];
const setTimeout = (fn, ms) => { timers.push(ms); if (ms === (server.poll_ms || 2000)) nextPoll = fn; return 0; };
const clearTimeout = () => {};
const globals = { document, location, localStorage, fetch, setTimeout, clearTimeout, Node, navigator: {} };
const timer = global.setTimeout(() => { console.error("the page never told its status line"); process.exit(3); }, 5000);
const settle = () => new Promise((resolve) => global.setTimeout(resolve, 20));
(async () => {
  const polled = (n) => new Promise((resolve) => { pollDone = () => { if (polls >= n) resolve(); }; });
  let first = polled(1);
  new Function(...Object.keys(globals), script)(...Object.values(globals));
  await first;
  for (let n = 2; n <= server.clusters.length; n++) {
    const next = polled(n);
    nextPoll();
    await next;
  }
  if (server.submit_plan) {
    byId["plan-model"].value = server.submit_plan.value;
    byId["plan-ctx"].value = server.submit_plan.ctx;
    byId.planform.listeners.submit({ preventDefault() {} });
    await settle();
  }
  global.clearTimeout(timer);
  const html = (id) => (byId[id] ? byId[id].html() : "");
  process.stdout.write(JSON.stringify({
    updated: byId.updated.textContent, summary: html("summary"), nodes: html("nodes"), models: html("models"),
    events: html("events"), plan_choices: html("plan-model"), plan: html("plan-result"), asked, timers,
  }));
})().catch((err) => { console.error(err.stack || err); process.exit(4); });
"""


def render_page(view: dict, tmp_path, more_views=(), events=(), choices=None, plan=None, submit_plan=None,
                search="", poll_ms=2000) -> dict:
    """Run the page's script against `view` (the /api/cluster body), then one more poll per
    view of `more_views`; the HTML it rendered and the URLs it asked for.

    events: answers of /api/events, in order ({"status", "body"}; none: 404); choices, plan:
    the body of /api/plan/choices (200) and the answer of /api/plan; submit_plan: the plan
    form's {"value", "ctx"} to submit after the polls; search: the page URL's query string,
    poll_ms: the poll interval it makes the page use."""
    server = {"clusters": [view, *more_views], "events": list(events),
              "choices": {"status": 200, "body": choices} if choices else None, "plan": plan,
              "submit_plan": submit_plan, "search": search, "poll_ms": poll_ms}
    (tmp_path / "page.js").write_text(page_script())
    (tmp_path / "server.json").write_text(json.dumps(server))
    (tmp_path / "harness.js").write_text(HARNESS)
    proc = subprocess.run([NODE, str(tmp_path / "harness.js"), str(tmp_path / "page.js"), str(tmp_path / "server.json")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    # The page catches its own errors and says so here; "live" means the view was rendered.
    assert out["updated"].startswith("live"), out["updated"]
    return out


def text_of(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).replace("&amp;", "&").split())


# ----------------------------------------------------------------------------- tests


@needs_node
def test_copying_model_shows_a_progress_bar_with_percent_rate_eta_and_source(tmp_path):
    out = render_page(view_json([node("laptop-1", store=store())], [model(transfer_=transfer())]), tmp_path)
    models = out["models"]
    assert 'class="pill copying">copying 45%<' in models
    assert 'role="progressbar"' in models and 'aria-valuenow="45"' in models and "width:45.2%" in models
    assert "109 MiB of 241 MiB · 64 MiB/s · about 2 s left · from desktop" in text_of(models)


@needs_node
def test_downloading_model_names_the_url_it_comes_from(tmp_path):
    t = transfer(source=HF_URL, done=int(1.1 * GIB), total=int(8.4 * GIB), rate=11.2 * MIB, eta=668)
    out = render_page(view_json([node()], [model("qwen-14b", "downloading", t, node_name="desktop")]), tmp_path)
    assert 'class="pill downloading">downloading 13%<' in out["models"]
    assert f"from {HF_URL}" in text_of(out["models"])
    assert "about 11 min left" in text_of(out["models"])


@needs_node
def test_model_reason_that_repeats_the_copy_progress_is_not_shown_twice(tmp_path):
    reason = "to laptop-1 from desktop: 45% of 241 MiB at 64 MiB/s, about 2 s left"
    out = render_page(view_json([node()], [model(transfer_=transfer(), reason=reason)]), tmp_path)
    assert reason not in text_of(out["models"])
    assert text_of(out["models"]).count("64 MiB/s") == 1


@needs_node
def test_node_card_shows_free_disk_and_file_count_of_its_store(tmp_path):
    out = render_page(view_json([node(store=store(files=3))], []), tmp_path)
    assert "812.3 GiB free" in text_of(out["nodes"])
    assert "3 model files in /srv/models" in text_of(out["nodes"])
    assert 'aria-label="desktop disk use of the model store"' in out["nodes"]


@needs_node
def test_node_card_shows_a_file_coming_into_its_store(tmp_path):
    out = render_page(view_json([node("laptop-1", store=store(), transfers=[transfer()])], []), tmp_path)
    assert "Copying gemma.gguf 45%" in text_of(out["nodes"])
    assert 'aria-valuenow="45"' in out["nodes"]


@needs_node
def test_gone_node_hides_its_stale_free_disk(tmp_path):
    out = render_page(view_json([node(state="gone", store=store())], []), tmp_path)
    assert "812.3 GiB" not in text_of(out["nodes"])
    assert "3 model files" in text_of(out["nodes"])


@needs_node
def test_view_from_before_stores_and_transfers_still_renders(tmp_path):
    view = view_json([node()], [model(state="loading")])
    for n in view["nodes"]:
        del n["store"], n["transfers"]
    for m in view["models"]:
        del m["file"]
        for r in m["replicas"]:
            del r["transfer"]
    out = render_page(view, tmp_path)
    assert "Model store: not reported yet" in text_of(out["nodes"])
    assert 'class="pill loading">loading<' in out["models"]
    assert "aria-valuenow" not in out["models"]  # no copy progress: only the load's moving bar


@needs_node
def test_copying_replica_without_progress_yet_shows_its_state_and_the_model_reason(tmp_path):
    out = render_page(view_json([node(store=None)], [model(transfer_=None, reason="to laptop-1")]), tmp_path)
    assert 'class="pill copying">copying<' in out["models"]
    assert "why: to laptop-1" in text_of(out["models"])
    assert "progressbar" not in out["models"]


@needs_node
def test_model_without_replicas_or_reason_renders_only_its_row(tmp_path):
    stopped = ModelView(name="idle", context=4096, state="stopped", replicas=[])
    out = render_page(view_json([node()], [stopped]), tmp_path)
    assert 'class="pill stopped">stopped<' in out["models"]
    assert "null" not in out["models"]


@needs_node
def test_summary_counts_copying_models(tmp_path):
    out = render_page(view_json([node()], [model(transfer_=transfer())]), tmp_path)
    assert 'class="pill copying">1 copying<' in out["summary"]


def test_every_snake_case_field_the_page_reads_is_served():
    """The page reads the view, the plan answer and the events by field name; a renamed or
    misspelt field would show as blank. `completion_tokens` (ReplicaView's token counter) is
    read only when present: the page shows "—" without it."""
    read = set(re.findall(r"\.([a-z][a-z0-9]*_[a-z0-9_]+)\b", page_script()))
    schemas = [ClusterView.model_json_schema(), PlanAnswer.model_json_schema(), PlanChoices.model_json_schema()]
    served = set(re.findall(r'"([a-z][a-z0-9_]*)"', json.dumps(schemas)))
    served |= {f.name for f in dataclasses.fields(NodeFit)}  # PlanAnswer.fit: `homefleet fit --json`
    served |= {"last_id", "completion_tokens"}  # GET /api/events; ReplicaView's counter (read only when present)
    assert {"disk_free_bytes", "bytes_done", "total_bytes", "rate_bytes_per_s", "eta_s", "completion_tokens",
            "last_id", "tokens_per_s", "fit_text", "plan_text"} <= read
    assert read - served == set()


# ----------------------------------------------------------------------------- live activity


def ready_view(completion_tokens: int | None, at: float, in_flight: int = 1) -> dict:
    """One ready replica of gemma (4 slots) with its completion_tokens counter; None: a view
    from a head without the counter."""
    r = ReplicaView(replica_id="gemma-0", node="desktop", state="ready", gpu_layers=19, total_layers=19,
                    in_flight=in_flight, slots=4)
    m = ModelView(name="gemma", context=8192, state="ready", replicas=[r], in_flight=in_flight)
    view = json.loads(ClusterView(nodes=[node()], models=[m], generated_at=at).model_dump_json())
    replica = view["models"][0]["replicas"][0]
    if completion_tokens is None:
        del replica["completion_tokens"]
    else:
        replica["completion_tokens"] = completion_tokens
    return view


def cells(html: str, label: str) -> list[str]:
    """Texts of the table cells labelled `label` (the phone layout's data-label)."""
    return [text_of(c) for c in re.findall(rf'<td[^>]*data-label="{label}"[^>]*>(.*?)</td>', html)]


@needs_node
def test_tokens_per_second_comes_from_successive_polls_of_the_replica_counter(tmp_path):
    out = render_page(ready_view(100, NOW), tmp_path, more_views=[ready_view(160, NOW + 2), ready_view(220, NOW + 4)])
    assert cells(out["models"], "Tokens/s") == ["30.0"]  # 120 tokens in 4 s
    assert "30.0 tokens/s" in text_of(out["summary"])


@needs_node
def test_tokens_per_second_is_a_dash_without_the_counter_and_zero_when_idle(tmp_path):
    assert cells(render_page(ready_view(None, NOW), tmp_path)["models"], "Tokens/s") == ["—"]
    idle = render_page(ready_view(500, NOW), tmp_path, more_views=[ready_view(500, NOW + 2)])
    assert cells(idle["models"], "Tokens/s") == ["0.0"]


@needs_node
def test_a_restarted_replica_counter_starts_a_new_rate(tmp_path):
    out = render_page(ready_view(900, NOW), tmp_path, more_views=[ready_view(10, NOW + 2), ready_view(30, NOW + 4)])
    assert cells(out["models"], "Tokens/s") == ["10.0"]


@needs_node
def test_requests_in_flight_show_per_replica_with_its_slots_and_in_the_summary(tmp_path):
    out = render_page(ready_view(0, NOW, in_flight=3), tmp_path)
    assert cells(out["models"], "In flight") == ["3 of 4 slots"]
    assert "3 in flight" in text_of(out["summary"])


@needs_node
def test_a_loading_replica_shows_a_moving_bar_and_how_long_it_has_loaded(tmp_path):
    loading = [view_json([node()], [model(state="loading", node_name="desktop")]) for _ in range(2)]
    loading[1]["generated_at"] = NOW + 4
    out = render_page(loading[0], tmp_path, more_views=loading[1:])
    bar = re.search(r'<div role="progressbar" aria-label="gemma loading on desktop"[^>]*>', out["models"]).group(0)
    assert 'class="bar indeterminate"' in bar and "aria-valuenow" not in bar
    assert "Loading on desktop 100% GPU · loading for 4 s" in text_of(out["models"])


@needs_node
@pytest.mark.parametrize(("search", "poll_ms"), [("", 2000), ("?refresh=0.5", 500), ("?refresh=0.01", 2000),
                                                ("?refresh=soon", 2000)])
def test_the_page_polls_every_2_s_or_as_often_as_its_refresh_parameter_says(tmp_path, search, poll_ms):
    out = render_page(ready_view(0, NOW), tmp_path, more_views=[ready_view(0, NOW + 1)], search=search, poll_ms=poll_ms)
    assert out["timers"].count(poll_ms) == 2


# ----------------------------------------------------------------------------- events


def event(id_: int, kind: str, reason: str, model_name="gemma", node_name="desktop", at=NOW) -> dict:
    return {"id": id_, "at": at, "kind": kind, "model": model_name, "node": node_name, "reason": reason}


@needs_node
def test_events_come_from_the_events_api_newest_first_asking_only_for_newer_ones(tmp_path):
    first = {"status": 200, "body": {"events": [event(1, "placed", "fits whole on the GPU"),
                                                event(2, "load_requested", "a request came", at=NOW + 1)], "last_id": 2}}
    second = {"status": 200, "body": {"events": [event(3, "loaded", "ready in 1.2 s", at=NOW + 3)], "last_id": 3}}
    view = ready_view(0, NOW)
    out = render_page(view, tmp_path, more_views=[ready_view(0, NOW + 2)], events=[first, second])
    texts = [text_of(li.split("</time>")[1]) for li in re.findall(r"<li>(.*?)</li>", out["events"])]
    assert texts == [
        "loaded ready in 1.2 s gemma on desktop", "load requested a request came gemma on desktop",
        "placed fits whole on the GPU gemma on desktop"]
    asked = [u for u in out["asked"] if u.startswith("/api/events")]
    assert asked == ["/api/events?limit=50", "/api/events?since=2&limit=50"]


@needs_node
def test_events_fall_back_to_the_cluster_view_without_the_events_api(tmp_path):
    view = ready_view(0, NOW)
    view["events"] = [{"id": 7, "at": NOW, "kind": "idle_unload", "model": "gemma", "node": "desktop",
                       "reason": "idle for 5m"}]
    out = render_page(view, tmp_path)  # /api/events answers 404
    assert "idle unload idle for 5m gemma on desktop" in text_of(out["events"])


@needs_node
def test_node_events_name_no_model(tmp_path):
    view = ready_view(0, NOW)
    view["events"] = [{"id": 8, "at": NOW, "kind": "node_gone", "model": "*", "node": "laptop-1", "reason": "no report for 30 s"}]
    out = render_page(view, tmp_path)
    assert "node gone no report for 30 s on laptop-1" in text_of(out["events"])
    assert "*" not in text_of(out["events"])


# ----------------------------------------------------------------------------- plan view

CHOICES = {"catalog": ["llama-2-7b", "qwen2.5-coder-14b"], "quants": ["Q4_K_M"], "files": [], "kv_types": ["f16"],
           "default_ctx": 4096}


def plan_body(placed=True) -> dict:
    fits = [{"node": "desktop", "verdict": "gpu", "summary": "whole on GPU (RTX 4070 Ti), 4 slots: 10.6 GiB of 15.2 GiB",
             "tokens_per_s": 61.4},
            {"node": "laptop-1", "verdict": "none", "summary": "does not fit: needs 11.0 GiB RAM CPU-only, 6.1 GiB usable",
             "tokens_per_s": None}]
    placement = ({"placed": True, "summary": "would run on desktop GPU 0, whole on the GPU, 4 slots", "reasons": {}}
                 if placed else {"placed": False, "summary": "fits on no node now",
                                 "reasons": {"desktop": "needs 10.6 GiB VRAM, 2.0 GiB usable"}})
    return {"model": "qwen2.5-coder-14b", "source": "catalog", "n_ctx": 8192, "kv_type": "f16", "flash_attn": False,
            "fit": {"nodes": fits}, "fit_text": "qwen2.5-coder-14b:q4_k_m (qwen2, ...)", "placement": placement,
            "plan_text": "NODES\n...\nPLACEMENT\n..."}


@needs_node
def test_plan_view_offers_the_files_the_nodes_hold_and_the_catalog(tmp_path):
    out = render_page(view_json([node("laptop-1", store=store(files=2))], []), tmp_path, choices=CHOICES)
    options = text_of(out["plan_choices"])
    assert "m0.gguf on laptop-1 (1 MiB)" in options and "m1.gguf on laptop-1" in options
    assert "llama-2-7b" in options and "qwen2.5-coder-14b" in options
    assert '{&quot;model&quot;:&quot;m0.gguf&quot;,&quot;node&quot;:&quot;laptop-1&quot;}' in out["plan_choices"]


@needs_node
def test_plan_view_shows_where_the_model_fits_per_node_and_what_the_cli_says(tmp_path):
    out = render_page(view_json([node()], []), tmp_path, choices=CHOICES, plan={"status": 200, "body": plan_body()},
                      submit_plan={"value": json.dumps({"model": "m0.gguf", "node": "desktop"}), "ctx": "8192"})
    assert "/api/plan?model=m0.gguf&ctx=8192&node=desktop" in out["asked"]
    text = text_of(out["plan"])
    assert "qwen2.5-coder-14b at 8,192 tokens of context: would run on desktop GPU 0, whole on the GPU, 4 slots" in text
    assert cells(out["plan"], "Fits") == ["whole on GPU", "does not fit"]
    assert cells(out["plan"], "Predicted") == ["~61 tokens/s", "–"]
    assert "needs 11.0 GiB RAM CPU-only" in text and "NODES ... PLACEMENT" in text


@needs_node
def test_plan_view_says_why_a_model_fits_nowhere_now(tmp_path):
    out = render_page(view_json([node()], []), tmp_path, choices=CHOICES, plan={"status": 200, "body": plan_body(False)},
                      submit_plan={"value": json.dumps({"model": "qwen2.5-coder-14b"}), "ctx": "8192"})
    assert 'class="plan-verdict none"' in out["plan"]
    assert "desktop: needs 10.6 GiB VRAM, 2.0 GiB usable" in text_of(out["plan"])


@needs_node
def test_plan_view_shows_the_gateway_error_message(tmp_path):
    error = {"status": 400, "body": {"error": {"message": "Invalid value for 'ctx': -1 is not between 0", "param": "ctx"}}}
    out = render_page(view_json([node()], []), tmp_path, choices=CHOICES, plan=error,
                      submit_plan={"value": json.dumps({"model": "llama-2-7b"}), "ctx": "-1"})
    assert "Invalid value for 'ctx': -1 is not between 0" in text_of(out["plan"])


# ----------------------------------------------------------------------------- GET /api/plan


class PlanFakeController(FakeController):
    """The gateway's fake controller with nodes in its view: a desktop with a 16 GiB card and
    a store, a laptop with none (tests/unit/test_gateway_fakes.py)."""

    def __init__(self, nodes: list[NodeView]) -> None:
        super().__init__()
        self.view_nodes = nodes

    def view(self) -> ClusterView:
        return super().view().model_copy(update={"nodes": self.view_nodes})


def laptop(name="laptop-1", state="alive") -> NodeView:
    hardware = NodeHardware(name=name, cpu_cores=8, cpu_threads=16, ram_total_bytes=16 * GIB,
                            ram_available_bytes=10 * GIB, gpus=[])
    return NodeView(name=name, address="192.168.1.11", state=state, hardware=hardware, reported_at=NOW - 1)


def plan_get(controller, query: str) -> httpx.Response:
    async def go():
        async with asgi_client(app_for(controller)) as client:
            return await client.get(f"/api/plan{query}")
    return asyncio.run(go())


@pytest.mark.parametrize(("query", "param", "code"), [
    ("", "model", "missing_required_parameter"),
    ("?model=%20", "model", "missing_required_parameter"),
    ("?model=no-such-model", "model", "invalid_value"),
    ("?model=llama-2-7b:q9_z", "model", "invalid_value"),
    ("?model=llama-2-7b&ctx=big", "ctx", "invalid_value"),
    ("?model=llama-2-7b&ctx=-1", "ctx", "invalid_value"),
    ("?model=llama-2-7b&ctx=%D9%A3", "ctx", "invalid_value"),  # an Arabic-Indic 3: digits are ASCII here
    ("?model=llama-2-7b&model=mpt-7b", "model", "invalid_value"),  # which one? never a silent pick
    ("?model=llama-2-7b&ctx=99999999", "ctx", "invalid_value"),
    ("?model=llama-2-7b&kv_type=f8", "kv_type", "invalid_value"),
    ("?model=llama-2-7b&kv_type=q8_0", "kv_type", "invalid_value"),  # quantized KV needs flash attention
    ("?model=llama-2-7b&flash_attn=maybe", "flash_attn", "invalid_value"),
    ("?model=m0.gguf&node=nas", "node", "invalid_value"),
    ("?model=llama-2-7b&context=8192", "context", "unknown_parameter"),
])
def test_plan_endpoint_answers_bad_input_with_a_400_naming_the_parameter(query, param, code):
    answer = plan_get(PlanFakeController([node(store=store())]), query)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert param in error["message"]


def test_plan_endpoint_fits_a_catalog_model_on_each_alive_node_and_places_it_on_the_gpu():
    gone = laptop("old-box", state="gone")
    answer = plan_get(PlanFakeController([node(), laptop(), gone]), "?model=qwen2.5-coder-14b&ctx=8192")
    assert answer.status_code == 200, answer.text
    plan = answer.json()
    assert (plan["source"], plan["n_ctx"], plan["kv_type"], plan["flash_attn"]) == ("catalog", 8192, "f16", False)
    verdicts = {n["node"]: n["verdict"] for n in plan["fit"]["nodes"]}
    assert verdicts == {"desktop": "gpu", "laptop-1": "none"}  # a gone node is not fitted
    assert plan["placement"]["placed"] and plan["placement"]["assignment"]["node"] == "desktop"
    assert plan["placement"]["summary"].startswith("would run on desktop GPU 0, whole on the GPU")
    assert "laptop-1  does not fit" in plan["fit_text"]


def test_plan_endpoint_gives_every_nodes_reason_when_the_model_fits_nowhere():
    plan = plan_get(PlanFakeController([node(), laptop()]), "?model=llama-2-70b:q8_0&ctx=4096").json()
    assert not plan["placement"]["placed"] and plan["placement"]["summary"] == "fits on no node now"
    assert set(plan["placement"]["reasons"]) == {"desktop", "laptop-1"}
    assert "NOT PLACED" in plan["plan_text"]


def test_plan_endpoint_reads_the_header_of_a_file_a_node_holds(tmp_path):
    from tests.gguf_factory import write_gguf

    path = write_gguf(tmp_path / "tiny.gguf", n_layers=3)
    held = StoreReport(models_dir=str(tmp_path), disk_free_bytes=GIB, disk_total_bytes=2 * GIB,
                       files=[StoredFile(name="tiny.gguf", path=str(path), size_bytes=path.stat().st_size)])
    plan = plan_get(PlanFakeController([node(store=held), laptop()]), "?model=tiny.gguf&ctx=1024").json()
    assert plan["source"] == f"desktop:{path}"
    assert plan["fit"]["n_layers"] == 3
    assert {n["verdict"] for n in plan["fit"]["nodes"]} == {"gpu", "cpu"}
    wrong_node = plan_get(PlanFakeController([node(store=held), laptop()]), "?model=tiny.gguf&node=laptop-1")
    assert wrong_node.status_code == 400 and "not a file on laptop-1" in wrong_node.json()["error"]["message"]


def test_plan_choices_list_the_catalog_and_the_files_of_alive_nodes():
    gone = node("old-box", state="gone", store=store(files=1))
    async def go():
        async with asgi_client(app_for(PlanFakeController([node(store=store(files=2)), gone]))) as client:
            return (await client.get("/api/plan/choices")).json()
    choices = asyncio.run(go())
    assert "qwen2.5-coder-14b" in choices["catalog"] and "Q8_0" in choices["quants"]
    assert [(f["name"], f["node"]) for f in choices["files"]] == [("m0.gguf", "desktop"), ("m1.gguf", "desktop")]


def test_plan_endpoint_is_documented_with_its_parameters_and_its_400():
    operation = app_for(FakeController()).openapi()["paths"]["/api/plan"]["get"]
    assert {p["name"] for p in operation["parameters"]} == {"model", "node", "ctx", "kv_type", "flash_attn"}
    assert {"200", "400", "401"} <= set(operation["responses"])


@contextlib.contextmanager
def served(app):
    """The app on a real port of 127.0.0.1, for the CLI to ask."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)


def test_plan_endpoint_says_what_homefleet_fit_and_plan_print_against_the_same_cluster(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HOMEFLEET_API_KEY", raising=False)
    controller = PlanFakeController([node(), laptop()])
    config = tmp_path / "homefleet.yaml"
    config.write_text("models:\n  - name: qwen2.5-coder-14b\n    catalog: qwen2.5-coder-14b\n    context: 8192\n")
    with served(app_for(controller)) as url:
        plan = httpx.get(f"{url}/api/plan", params={"model": "qwen2.5-coder-14b", "ctx": "8192"}).json()
        capsys.readouterr()
        assert main(["fit", "qwen2.5-coder-14b", "--ctx", "8192", "--url", url]) == 0
        fit_printed = capsys.readouterr().out
        assert main(["plan", "--url", url, "--config", str(config)]) == 0
        plan_printed = capsys.readouterr().out
    assert plan["fit_text"] + "\n" == fit_printed
    assert plan["plan_text"] == plan_printed


# ----------------------------------------------------------------------------- homefleet status --watch


class Screen(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_watch_frame_off_a_terminal_is_plain_text_frames_apart():
    frame = watch_frame("NODES\nMODELS\n", "homefleet status http://h:8000", in_place=False)
    assert frame == "homefleet status http://h:8000\n\nNODES\nMODELS\n\n"


def test_watch_frame_on_a_terminal_draws_over_the_last_one_without_clearing_first():
    frame = watch_frame("NODES\nMODELS", "title", in_place=True)
    assert frame == "\x1b[H" + "title\x1b[K\n\x1b[K\nNODES\x1b[K\nMODELS\x1b[K\n" + "\x1b[J"
    assert "\x1b[2J" not in frame  # no blank flash between frames


def test_watch_draws_a_frame_each_interval_less_the_time_the_frame_took():
    texts, naps, now = iter(["one", "two", "three"]), [], [100.0]

    def clock():
        now[0] += 0.25  # each frame takes 0.25 s to fetch and draw
        return now[0]

    out = Screen(tty=False)
    assert watch(lambda: next(texts), "t", 2.0, out, sleep=naps.append, clock=clock, frames=3) == 0
    assert naps == [1.75, 1.75]
    assert [block.split("\n")[-1] for block in out.getvalue().strip().split("\n\n")[1::2]] == ["one", "two", "three"]
    assert "\x1b" not in out.getvalue()


def test_watch_ends_on_ctrl_c_with_code_0_and_gives_the_cursor_back():
    def interrupted(seconds):
        raise KeyboardInterrupt

    out = Screen(tty=True)
    assert watch(lambda: "tables", "t", 2.0, out, sleep=interrupted) == 0
    assert out.getvalue().startswith("\x1b[?25l\x1b[H") and out.getvalue().endswith("\x1b[?25h")


def test_watch_interval_below_the_minimum_or_not_a_number_is_refused():
    parser = argparse.ArgumentParser()
    status_command.register(parser.add_subparsers())
    assert parser.parse_args(["status", "--watch", "-n", "0.5"]).interval == 0.5
    for bad in ("0", "-1", "soon", "nan"):
        with pytest.raises(SystemExit):
            parser.parse_args(["status", "--watch", "--interval", bad])


@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
def test_status_watch_refreshes_until_ctrl_c_then_exits_0(terminal):
    """The real command against a real gateway (the fake controller's), on a pipe and on a
    pseudo-terminal; SIGINT is Ctrl-C."""
    with served(app_for(FakeController())) as url:
        command = [sys.executable, "-c", "import sys; from orchestrator.cli import main; sys.exit(main())",
                   "status", "--watch", "--interval", "0.3", "--url", url]
        if terminal:
            controller_fd, tty_fd = pty.openpty()
            proc = subprocess.Popen(command, stdin=tty_fd, stdout=tty_fd, stderr=subprocess.PIPE)
            os.close(tty_fd)
            read = lambda: os.read(controller_fd, 65536)  # noqa: E731
        else:
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            os.set_blocking(proc.stdout.fileno(), False)
            read = lambda: proc.stdout.read() or b""  # noqa: E731
        seen = b""
        deadline = time.monotonic() + 30
        while seen.count(b"MODELS") < 3 and time.monotonic() < deadline:
            if select.select([controller_fd if terminal else proc.stdout], [], [], 1)[0]:
                seen += read()
        proc.send_signal(signal.SIGINT)
        code = proc.wait(10)
        if terminal:
            os.close(controller_fd)
    assert seen.count(b"MODELS") >= 3, seen[-2000:]
    assert code == 0, proc.stderr.read()
    assert f"homefleet status {url}  every 0.3s".encode() in seen
    if terminal:
        assert b"\x1b[H" in seen and b"\x1b[?25l" in seen
    else:
        assert b"\x1b" not in seen
