"""The analytic memory estimate: llama.cpp's offload order, KV cache, compute buffers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from orchestrator.core.estimate import (
    CUDA_OVERHEAD_BYTES,
    EstimateError,
    EstimateOptions,
    estimate,
    graph_peak_bytes,
    kv_layer_bytes,
    need_function,
)
from orchestrator.core.model_shape import ModelShape, shape_from_gguf, swa_layer_pattern

MIB = 1024**2


def shape_of(
    n_layers=4, n_embd=1024, n_head=16, n_head_kv=4, head_dim=64, n_ff=2816, n_vocab=32000, layer_mib=10,
    output_mib=30, embd_mib=20, tied=False, **extra,
) -> ModelShape:
    """A llama-like shape with round numbers: blocks of `layer_mib`, output, embedding."""
    fields = dict(
        name="test", architecture="llama", n_layers=n_layers, n_embd=n_embd, n_head=n_head,
        n_head_kv=(n_head_kv,) * n_layers, head_dim_k=head_dim, head_dim_v=head_dim, n_vocab=n_vocab,
        n_ctx_train=8192, n_ff=n_ff, layer_weight_bytes=(layer_mib * MIB,) * n_layers,
        output_bytes=(embd_mib if tied else output_mib) * MIB, token_embd_bytes=embd_mib * MIB, file_bytes=0,
        weight_type="Q8_0", output_tied=tied, layer_repack_bytes=(0,) * n_layers,
    )
    return ModelShape(**(fields | extra))


@pytest.mark.parametrize(
    "kv_type, flash_attn, bytes_per_element",
    [("f16", False, 2.0), ("f16", True, 2.0), ("q8_0", True, 34 / 32), ("q4_0", True, 18 / 32), ("f32", False, 4.0)],
)
def test_kv_per_layer_is_2_x_ctx_x_kv_heads_x_head_dim_x_type_bytes(kv_type, flash_attn, bytes_per_element):
    shape = shape_of(n_head_kv=4, head_dim=128)
    opts = EstimateOptions(4096, kv_type=kv_type, flash_attn=flash_attn)
    assert kv_layer_bytes(shape, 0, opts) == int(2 * 4096 * 4 * 128 * bytes_per_element)


def test_context_is_padded_to_a_multiple_of_256_cells_like_llama_cpp():
    opts = EstimateOptions(1000)
    assert estimate(shape_of(), 0, opts).n_ctx == 1024
    assert kv_layer_bytes(shape_of(), 0, opts) == kv_layer_bytes(shape_of(), 0, EstimateOptions(1024))


@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
def test_a_quantized_kv_cache_without_flash_attention_is_refused_with_the_reason(kv_type):
    with pytest.raises(EstimateError, match="needs flash attention"):
        EstimateOptions(4096, kv_type=kv_type)


@pytest.mark.parametrize(
    "k, gpu_layer_mib, output_on_gpu",
    [(0, 0, False), (1, 0, True), (2, 10, True), (3, 20, True), (5, 40, True), (99, 40, True), (-1, 40, True)],
)
def test_offloading_k_layers_moves_the_output_layer_first_then_the_last_blocks(k, gpu_layer_mib, output_on_gpu):
    e = estimate(shape_of(), k, EstimateOptions(2048))
    expected = (gpu_layer_mib + (30 if output_on_gpu else 0)) * MIB
    assert e.breakdown.weights_gpu_bytes == expected
    assert e.n_gpu_layers == min(5, 99 if k < 0 else k)


def test_kv_of_a_block_lives_where_the_block_lives():
    shape, opts = shape_of(), EstimateOptions(2048)
    per_layer = kv_layer_bytes(shape, 0, opts)
    e = estimate(shape, 3, opts)  # output + blocks 2 and 3
    assert (e.breakdown.kv_gpu_bytes, e.breakdown.kv_cpu_bytes) == (2 * per_layer, 2 * per_layer)


def test_the_token_embedding_stays_on_the_cpu_even_with_every_layer_offloaded():
    e = estimate(shape_of(), -1, EstimateOptions(2048))
    assert e.mmap_bytes == 20 * MIB and e.breakdown.weights_gpu_bytes == (4 * 10 + 30) * MIB


def test_a_tied_output_puts_a_copy_of_the_embedding_on_the_gpu_and_keeps_the_original():
    shape = shape_of(tied=True)
    on_gpu, on_cpu = estimate(shape, 1, EstimateOptions(2048)), estimate(shape, 0, EstimateOptions(2048))
    assert on_gpu.breakdown.weights_gpu_bytes == 20 * MIB and on_gpu.mmap_bytes == (20 + 40) * MIB
    assert on_cpu.mmap_bytes == (20 + 40) * MIB  # shared, not counted twice


def test_gpu_need_grows_and_host_need_shrinks_with_every_offloaded_layer():
    shape = shape_of(n_layers=8)
    need = need_function(shape, EstimateOptions(4096))
    needs = [need(k) for k in range(1, shape.n_layers + 2)]
    assert all(a.gpu_bytes < b.gpu_bytes for a, b in zip(needs, needs[1:]))
    assert all(a.ram_bytes >= b.ram_bytes for a, b in zip(needs, needs[1:]))


def test_cuda_context_is_counted_only_when_layers_are_on_the_gpu():
    shape, opts = shape_of(), EstimateOptions(2048)
    assert estimate(shape, 0, opts).gpu_bytes == 0
    assert estimate(shape, 1, opts).breakdown.overhead_gpu_bytes == CUDA_OVERHEAD_BYTES
    assert estimate(shape, 5, opts, gpu=False) == estimate(shape, 0, opts, gpu=True)


def test_gemma3_has_five_sliding_window_layers_then_one_global_layer():
    assert swa_layer_pattern(12, 6) == (True,) * 5 + (False,) + (True,) * 5 + (False,)
    assert swa_layer_pattern(4, 2) == (True, False, True, False)  # gemma2 alternates


def test_sliding_window_layers_hold_the_window_plus_a_ubatch_only_when_swa_full_is_off():
    shape = shape_of(n_layers=6, sliding_window=512, swa_layers=swa_layer_pattern(6, 6))
    full = EstimateOptions(32768)
    small = EstimateOptions(32768, swa_full=False)
    assert kv_layer_bytes(shape, 0, full) == kv_layer_bytes(shape, 5, full)  # llama.cpp's default
    assert kv_layer_bytes(shape, 0, small) * 32 == kv_layer_bytes(shape, 5, small)  # 1024 of 32768 cells
    assert kv_layer_bytes(shape, 5, small) == kv_layer_bytes(shape, 5, full)


def test_an_mla_cache_holds_the_compressed_k_only():
    shape = shape_of(kv_lora_rank=512, rope_dim=64)
    assert kv_layer_bytes(shape, 0, EstimateOptions(4096)) == 4096 * 576 * 2


def test_without_flash_attention_the_compute_buffer_grows_by_ctx_x_ubatch_x_heads():
    shape = shape_of(n_head=32, head_dim=32)
    small, big = EstimateOptions(8192), EstimateOptions(16384)
    growth = graph_peak_bytes(shape, big, 1) - graph_peak_bytes(shape, small, 1)
    assert growth == 8192 * 512 * (32 + 1) * 4  # KQ in f32 plus the f32 mask
    fa_growth = graph_peak_bytes(shape, replace(big, flash_attn=True), 1) - graph_peak_bytes(
        shape, replace(small, flash_attn=True), 1)
    assert fa_growth <= 8192 * 512 * 2  # the f16 mask only


def test_gpu_compute_holds_logits_for_the_whole_ubatch_and_cpu_compute_for_one_token():
    shape = shape_of(n_vocab=262144)
    opts = EstimateOptions(2048, flash_attn=True)
    whole = estimate(shape, -1, opts).breakdown.compute_gpu_bytes
    cpu = estimate(shape, 0, opts).breakdown.compute_cpu_bytes
    assert whole >= 262144 * 512 * 4 > cpu


def test_cpu_only_repacked_weights_are_anonymous_but_counted_once_in_the_need():
    shape = shape_of(layer_repack_bytes=(8 * MIB,) * 4)
    e = estimate(shape, 0, EstimateOptions(2048))
    assert e.breakdown.weights_repacked_bytes == 32 * MIB and e.mmap_bytes == (20 + 40 + 30) * MIB
    assert need_function(shape, EstimateOptions(2048))(0).ram_bytes == e.ram_bytes + e.mmap_bytes - 32 * MIB
    assert estimate(shape, 1, EstimateOptions(2048)).breakdown.weights_repacked_bytes == 0  # CUDA host buffers


@pytest.fixture(scope="module")
def sparse_models(tmp_path_factory):
    from tests.gguf_factory import write_gguf

    d = tmp_path_factory.mktemp("sparse")
    return {
        "llama-gqa": write_gguf(d / "l.gguf", arch="llama", n_layers=4, n_embd=4096, n_head=32, n_head_kv=8,
                                n_ff=14336, n_vocab=128256, weight_dtype="q4_k", sparse=True),
        "gemma3-swa": write_gguf(d / "g.gguf", arch="gemma3", n_layers=12, n_embd=1152, n_head=4, n_head_kv=1,
                                 head_dim=256, n_ff=6912, n_vocab=262144, weight_dtype="q8_0", sparse=True),
    }


@pytest.mark.parametrize("model", ["llama-gqa", "gemma3-swa"])
@pytest.mark.parametrize("n_ctx, kv_type, flash_attn", [(4096, "f16", False), (8192, "q8_0", True)])
def test_kv_and_compute_agree_with_llama_cpp_dry_run(sparse_models, model, n_ctx, kv_type, flash_attn):
    from worker.dry_run import dry_run

    path = sparse_models[model]
    shape, opts = shape_from_gguf(path), EstimateOptions(n_ctx, kv_type=kv_type, flash_attn=flash_attn)
    dry = dry_run(path, n_ctx, 0, kv_type=kv_type, flash_attn=flash_attn)
    assert dry.error is None, dry.error
    e = estimate(shape, 0, opts, gpu=False)
    assert e.breakdown.kv_cpu_bytes == pytest.approx(dry.kv_cpu_bytes, abs=0.02 * MIB)
    assert 0.99 * dry.compute_cpu_bytes <= graph_peak_bytes(shape, opts, 1) <= 1.15 * dry.compute_cpu_bytes
    assert 0.99 * dry.compute_cpu_alloc_bytes <= graph_peak_bytes(shape, opts, 512) <= 1.15 * dry.compute_cpu_alloc_bytes
    assert e.breakdown.weights_repacked_bytes == dry.repacked_bytes
