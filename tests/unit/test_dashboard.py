"""The dashboard page (`GET /`): its script, run under Node.js against cluster views.

The page's own <script> runs unchanged in a small stand-in for the browser (a DOM of plain
objects, a `fetch` that answers one `/api/cluster` body); the test reads the HTML it
rendered. Without `node` on PATH those tests are skipped; the field-name check still runs.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from importlib import resources

import pytest

from orchestrator.cluster_view import ClusterView, ModelView, NodeView, ReplicaView
from orchestrator.core.hardware import GIB, MIB, GpuInfo, NodeHardware
from orchestrator.core.store_types import StoredFile, StoreReport, TransferProgress

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
const [script, body] = [fs.readFileSync(process.argv[2], "utf8"), fs.readFileSync(process.argv[3], "utf8")];
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
    this.dataset = {}; this.value = "";
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
  addEventListener() {}
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
let polled;
const done = new Promise((resolve) => { polled = resolve; });
// The page tells its status line after every poll, rendered or not: that is when to read it.
class StatusLine extends Element {
  get textContent() { return super.textContent; }
  set textContent(text) { super.textContent = text; polled(); }
}
const byId = { updated: new StatusLine("div") };
for (const id of ["summary", "keyform", "apikey", "base-url", "curl", "nodes", "models"]) byId[id] = new Element("div");
const document = {
  body: new Element("body"),
  createElement: (tag) => new Element(tag),
  createTextNode: (text) => new Text(text),
  getElementById: (id) => byId[id],
  addEventListener() {},
};
const location = { origin: "http://127.0.0.1:8000", hostname: "127.0.0.1" };
const localStorage = { getItem: () => null, setItem() {}, removeItem() {} };
const fetch = async () => ({ status: 200, ok: true, text: async () => body });
const setTimeout = () => 0;  // no second poll, no request timeout
const clearTimeout = () => {};
const globals = { document, location, localStorage, fetch, setTimeout, clearTimeout, Node, navigator: {} };
new Function(...Object.keys(globals), script)(...Object.values(globals));
const timer = global.setTimeout(() => { console.error("the page never told its status line"); process.exit(3); }, 5000);
done.then(() => {
  global.clearTimeout(timer);
  const [summary, nodes, models] = [byId.summary.html(), byId.nodes.html(), byId.models.html()];
  process.stdout.write(JSON.stringify({ updated: byId.updated.textContent, summary, nodes, models }));
});
"""


def render_page(view: dict, tmp_path) -> dict:
    """Run the page's script once against `view` (the /api/cluster body); the HTML it rendered."""
    (tmp_path / "page.js").write_text(page_script())
    (tmp_path / "view.json").write_text(json.dumps(view))
    (tmp_path / "harness.js").write_text(HARNESS)
    proc = subprocess.run([NODE, str(tmp_path / "harness.js"), str(tmp_path / "page.js"), str(tmp_path / "view.json")],
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
    assert "progressbar" not in out["models"]


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


def test_every_snake_case_field_the_page_reads_is_in_the_cluster_view():
    """The page reads the view by field name; a renamed or misspelt field would show as blank."""
    read = set(re.findall(r"\.([a-z][a-z0-9]*_[a-z0-9_]+)\b", page_script()))
    served = set(re.findall(r'"([a-z][a-z0-9_]*)"', json.dumps(ClusterView.model_json_schema())))
    assert {"disk_free_bytes", "bytes_done", "total_bytes", "rate_bytes_per_s", "eta_s"} <= read
    assert read - served == set()
