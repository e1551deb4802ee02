"""`homefleet fit`: per-node verdicts with placement's margins, speed, and the CLI."""

from __future__ import annotations

import json

import pytest

from orchestrator.cli import main
from orchestrator.core import catalog
from orchestrator.core.estimate import EstimateOptions, need_function
from orchestrator.core.hardware import GIB, MIB, GpuInfo, NodeHardware
from orchestrator.fit import (
    decode_tokens_per_s,
    fit_node,
    fit_report,
    fit_to_dict,
    render_fit,
    usable_ram_bytes,
    usable_vram_bytes,
)
from orchestrator.machines import HardwareFileError, default_machine_files, load_hardware_file, load_machines
from tests.gguf_factory import write_gguf

OPTS = EstimateOptions(4096)


def node(name="box", ram_gib=64, vram_gib=None, free_vram_gib=None, gpu_gbps=500.0, ram_gbps=80.0) -> NodeHardware:
    gpus = []
    if vram_gib is not None:
        gpus.append(GpuInfo(name="Test GPU", vram_total_bytes=vram_gib * GIB, memory_bandwidth_gbps=gpu_gbps,
                            vram_free_bytes=None if free_vram_gib is None else int(free_vram_gib * GIB)))
    return NodeHardware(name=name, ram_total_bytes=ram_gib * GIB, ram_bandwidth_gbps=ram_gbps, gpus=gpus)


@pytest.mark.parametrize(
    "total_gib, free_gib, usable",
    [(16, 16, 16 * GIB - int(0.05 * 16 * GIB)), (6, 6, 6 * GIB - int(0.05 * 6 * GIB)), (2, 2, 2 * GIB - 256 * MIB),
     (16, 10, 10 * GIB - int(0.05 * 16 * GIB))],
)
def test_usable_vram_is_free_minus_the_larger_of_256_mib_and_5_percent_as_in_placement(total_gib, free_gib, usable):
    gpu = node(vram_gib=total_gib, free_vram_gib=free_gib).gpus[0]
    assert usable_vram_bytes(gpu) == usable


def test_usable_ram_is_available_minus_the_larger_of_1_gib_and_5_percent():
    assert usable_ram_bytes(node(ram_gib=64)) == 64 * GIB - int(0.05 * 64 * GIB)
    assert usable_ram_bytes(node(ram_gib=8)) == 7 * GIB


@pytest.mark.parametrize(
    "model, box, verdict",
    [
        ("gemma-3-270m", node(vram_gib=6), "gpu"),
        ("qwen2.5-coder-32b", node(vram_gib=16), "split"),
        ("qwen2.5-coder-32b", node(ram_gib=64), "cpu"),
        ("llama-2-70b:f16", node(ram_gib=64, vram_gib=16), "none"),
        ("llama-2-7b:q8_0", node(vram_gib=16, free_vram_gib=2), "split"),
    ],
)
def test_verdict_is_whole_gpu_split_cpu_or_none(model, box, verdict):
    assert fit_node(catalog.lookup(model), OPTS, box).verdict == verdict


def test_a_split_takes_the_most_layers_whose_need_fits_the_usable_vram():
    shape, box = catalog.lookup("qwen2.5-coder-32b"), node(vram_gib=16)
    fit = fit_node(shape, OPTS, box)
    need = need_function(shape, OPTS)
    usable = usable_vram_bytes(box.gpus[0])
    assert need(fit.n_gpu_layers).gpu_bytes <= usable < need(fit.n_gpu_layers + 1).gpu_bytes
    assert fit.summary.startswith(f"{fit.n_gpu_layers} of 65 layers on GPU")


def test_does_not_fit_gives_the_reason_in_numbers():
    fit = fit_node(catalog.lookup("llama-2-70b:f16"), OPTS, node(ram_gib=64, vram_gib=16))
    assert "does not fit: needs" in fit.summary and "VRAM for all 81 layers" in fit.summary
    assert "GiB usable" in fit.summary and fit.tokens_per_s is None


def test_decode_speed_is_effective_bandwidth_over_weight_bytes_read_per_token():
    shape = catalog.lookup("llama-2-7b")
    box = node(vram_gib=16, gpu_gbps=500.0)
    gpu_read = sum(shape.layer_weight_bytes) + shape.output_bytes
    expected = 500e9 * 0.7 / gpu_read
    assert decode_tokens_per_s(shape, shape.n_layers + 1, box, box.gpus[0]) == pytest.approx(expected)
    cpu_only = decode_tokens_per_s(shape, 0, box, None)
    assert cpu_only == pytest.approx(80e9 * 0.55 / gpu_read)


def test_a_per_node_calibration_factor_scales_the_predicted_speed():
    shape, box = catalog.lookup("llama-2-7b"), node(vram_gib=16)
    report = fit_report(shape, OPTS, [box], calibrations={"box": 1.5})
    plain = fit_report(shape, OPTS, [box])
    assert report.nodes[0].tokens_per_s == pytest.approx(1.5 * plain.nodes[0].tokens_per_s)


def test_speed_is_unknown_without_a_bandwidth():
    box = NodeHardware(name="x", ram_total_bytes=64 * GIB)
    assert fit_node(catalog.lookup("gemma-3-270m"), OPTS, box).tokens_per_s is None


def test_report_renders_a_breakdown_and_one_line_per_reference_machine():
    report = fit_report(catalog.lookup("qwen2.5-coder-32b"), OPTS, load_machines())
    text = render_fit(report)
    for word in ("weights", "KV cache", "compute buffers", "overhead", "desktop", "laptop-1", "laptop-2"):
        assert word in text
    data = fit_to_dict(report)
    assert [n["node"] for n in data["nodes"]] == ["desktop", "laptop-1", "laptop-2"]
    json.dumps(data)


def test_reference_machine_files_are_found_and_valid():
    names = [load_hardware_file(p).name for p in default_machine_files()]
    assert names == ["desktop", "laptop-1", "laptop-2"]


def test_a_bad_hardware_file_names_the_file_and_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nram_total_bytes: lots\n")
    with pytest.raises(HardwareFileError, match=r"bad.yaml: ram_total_bytes"):
        load_hardware_file(path)


def test_cli_fit_of_a_catalog_name_prints_json_with_a_verdict_per_node(capsys):
    assert main(["fit", "qwen2.5-coder-32b", "--ctx", "8192", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["weight_type"] == "Q4_K_M" and data["n_ctx"] == 8192
    assert {n["node"]: n["verdict"] for n in data["nodes"]}["desktop"] == "split"


def test_cli_fit_of_a_gguf_file_reads_its_header(tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny.gguf", arch="qwen2", n_layers=2, n_embd=256, n_head=4, n_head_kv=2)
    assert main(["fit", str(path), "--ctx", "2048", "--flash-attn", "--kv-type", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "factory-qwen2-2L-256 (qwen2, F16, 2 layers + output" in out and "whole on GPU" in out


def test_cli_fit_refuses_a_quantized_kv_cache_without_flash_attention(capsys):
    assert main(["fit", "gemma-3-270m", "--kv-type", "q4_0"]) == 2
    assert "needs flash attention" in capsys.readouterr().err


def test_cli_fit_of_an_unknown_model_lists_the_catalog(capsys):
    assert main(["fit", "gpt-17"]) == 2
    assert "neither a .gguf file nor a catalog model" in capsys.readouterr().err


def test_cli_fit_of_a_file_that_is_not_gguf_says_so(tmp_path, capsys):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"nope" * 10)
    assert main(["fit", str(path)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err


def test_cli_fit_exits_1_when_no_node_can_hold_the_model(capsys):
    assert main(["fit", "llama-2-70b:f16"]) == 1


def test_measured_speed_calibrates_a_node_with_known_bandwidth_by_a_factor():
    from orchestrator.fit import calibrate_speed, decode_tokens_per_s

    shape = catalog.lookup("llama-3.1-8b")
    node = load_machines()[0]  # declared bandwidths
    gpu = node.gpus[0]
    predicted = decode_tokens_per_s(shape, shape.n_layers + 1, node, gpu)
    same, factor = calibrate_speed(node, shape, shape.n_layers + 1, gpu, predicted / 2)
    assert same == node and abs(factor - 0.5) < 1e-9


def test_measured_cpu_speed_gives_a_probed_node_its_effective_ram_bandwidth():
    from orchestrator.fit import calibrate_speed, decode_tokens_per_s

    shape = catalog.lookup("llama-3.1-8b")
    probed = load_machines()[0].model_copy(update={"ram_bandwidth_gbps": None, "gpus": []})
    assert decode_tokens_per_s(shape, 0, probed, None) is None
    calibrated, factor = calibrate_speed(probed, shape, 0, None, 7.0)
    assert factor == 1.0
    assert abs(decode_tokens_per_s(shape, 0, calibrated, None) - 7.0) < 0.1


def test_each_node_gets_the_most_slots_up_to_four_that_keep_its_verdict():
    shape = catalog.lookup("qwen2.5-coder-14b")
    opts = EstimateOptions(8192)
    report = fit_report(shape, opts, [node("big", vram_gib=16), node("small", vram_gib=6), node("cpu")])
    big, small, cpu = report.nodes
    assert (big.verdict, big.n_slots) == ("gpu", 4) and ", 4 slots:" in big.summary
    assert small.verdict == "split" and small.n_slots == 4
    assert cpu.verdict == "cpu" and cpu.n_slots == 4
    one = fit_node(shape, opts, node("small", vram_gib=6))  # fit_node alone: exactly opts.n_slots
    assert one.n_slots == 1 and small.n_gpu_layers < one.n_gpu_layers  # a split gives layers to the slots' KV
    assert "breakdown for 1 slot, nodes with up to 4" in render_fit(report)


def test_a_whole_gpu_fit_keeps_fewer_slots_rather_than_becoming_a_split():
    shape = catalog.lookup("qwen2.5-coder-14b")
    box = node("big", vram_gib=16, free_vram_gib=13)  # 12.2 GiB usable: 1 slot at 8k is 10.6 GiB, 2 are 12.1
    fit = fit_report(shape, EstimateOptions(8192), [box]).nodes[0]
    assert (fit.verdict, fit.n_slots) == ("gpu", 2)
    assert fit_report(shape, EstimateOptions(8192), [box], max_slots=1).nodes[0].n_slots == 1
