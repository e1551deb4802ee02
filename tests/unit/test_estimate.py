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
    kv_cells,
    kv_layer_bytes,
    need_function,
    output_buffer_bytes,
    output_rows,
    slot_needs,
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


def test_sliding_window_layers_hold_the_window_plus_a_ubatch_unless_swa_full():
    shape = shape_of(n_layers=6, sliding_window=512, swa_layers=swa_layer_pattern(6, 6))
    full = EstimateOptions(32768, swa_full=True)  # llama-cpp-python's Llama
    small = EstimateOptions(32768)  # the batched engine (swa_full=False)
    assert kv_layer_bytes(shape, 0, full) == kv_layer_bytes(shape, 5, full)
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


def test_llama_default_outputs_reserve_logits_for_the_whole_ubatch_on_gpu_and_touch_one_row_on_cpu():
    shape = shape_of(n_vocab=262144)
    opts = EstimateOptions(2048, flash_attn=True, n_outputs_max=0)  # llama.cpp's default: n_batch rows
    whole = estimate(shape, -1, opts).breakdown.compute_gpu_bytes
    cpu = estimate(shape, 0, opts).breakdown.compute_cpu_bytes
    assert whole >= 262144 * 512 * 4 > cpu


@pytest.mark.parametrize("n_slots", [1, 4, 8])
def test_engine_reserves_one_row_of_logits_per_slot_not_per_ubatch(n_slots):
    shape = shape_of(n_vocab=262144)
    engine = EstimateOptions(2048, flash_attn=True, n_slots=n_slots)
    whole = estimate(shape, -1, engine).breakdown.compute_gpu_bytes
    assert whole == graph_peak_bytes(shape, engine, n_slots) < 262144 * 512 * 4
    assert output_rows(shape, engine) == (n_slots, n_slots)


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
@pytest.mark.parametrize("n_ctx, kv_type, flash_attn, n_slots",
                         [(4096, "f16", False, 1), (8192, "q8_0", True, 1), (4096, "f16", False, 4)])
def test_kv_and_compute_agree_with_llama_cpp_dry_run(sparse_models, model, n_ctx, kv_type, flash_attn, n_slots):
    from worker.dry_run import dry_run

    path = sparse_models[model]
    shape = shape_from_gguf(path)
    opts = EstimateOptions(n_ctx, kv_type=kv_type, flash_attn=flash_attn, n_slots=n_slots)
    dry = dry_run(path, n_ctx, 0, kv_type=kv_type, flash_attn=flash_attn, n_slots=n_slots)
    assert dry.error is None, dry.error
    assert dry.n_slots == n_slots
    e = estimate(shape, 0, opts, gpu=False)
    assert e.breakdown.kv_cpu_bytes == pytest.approx(dry.kv_cpu_bytes, abs=0.02 * MIB)
    assert 0.99 * dry.compute_cpu_bytes <= graph_peak_bytes(shape, opts, n_slots) <= 1.15 * dry.compute_cpu_bytes
    assert output_buffer_bytes(shape, opts) == pytest.approx(dry.output_bytes, abs=0.02 * MIB)
    assert e.breakdown.weights_repacked_bytes == dry.repacked_bytes


# ---------------------------------------------------------------- slots (the batched engine)


def test_kv_grows_by_one_full_context_per_slot():
    shape = shape_of()
    one, four = EstimateOptions(4096), EstimateOptions(4096, n_slots=4)
    assert kv_layer_bytes(shape, 0, four) == 4 * kv_layer_bytes(shape, 0, one) == 4 * 2 * 4096 * 4 * 64 * 2
    assert estimate(shape, 0, four).n_ctx == 4096  # per slot: every slot has the whole context
    grown = estimate(shape, 0, four).breakdown.kv_cpu_bytes - estimate(shape, 0, one).breakdown.kv_cpu_bytes
    assert grown == 3 * estimate(shape, 0, one).breakdown.kv_cpu_bytes


def test_each_slot_of_a_sliding_window_layer_holds_the_window_plus_a_ubatch_padded_to_256():
    shape = shape_of(n_layers=6, sliding_window=512, swa_layers=swa_layer_pattern(6, 6))
    opts = EstimateOptions(32768, n_slots=4)
    assert kv_cells(shape, 0, opts) == 1024  # pad256(512 + 512), per slot
    assert kv_cells(shape, 5, opts) == 32768  # the global layer: the whole context, per slot
    assert kv_cells(shape, 0, EstimateOptions(700, n_slots=4)) == 768  # a slot's context caps the window
    assert kv_cells(shape, 0, EstimateOptions(32768, n_ubatch=100, n_slots=4)) == 768  # pad256(512 + 100)
    assert kv_layer_bytes(shape, 0, opts) == 4 * 1024 * 2 * 4 * 64 * 2


def test_the_compute_graph_does_not_grow_with_slots_but_the_logits_do():
    shape = shape_of(n_vocab=262144)
    one, eight = EstimateOptions(4096, flash_attn=True), EstimateOptions(4096, flash_attn=True, n_slots=8)
    assert output_buffer_bytes(shape, eight) == 8 * 262144 * 4 == 8 * output_buffer_bytes(shape, one)
    whole_one, whole_eight = estimate(shape, -1, one).breakdown, estimate(shape, -1, eight).breakdown
    assert whole_eight.compute_cpu_bytes - whole_one.compute_cpu_bytes == 7 * 262144 * 4  # the output buffer
    assert graph_peak_bytes(shape, eight, 1) == graph_peak_bytes(shape, one, 1)  # each stream attends its own cells


def test_one_slot_of_the_engine_is_llamas_figure_but_for_the_reserved_logits():
    shape = shape_of(n_vocab=262144)
    engine = EstimateOptions(4096, flash_attn=True)
    llama = EstimateOptions(4096, flash_attn=True, swa_full=True, n_outputs_max=0)
    assert estimate(shape, 0, engine) == estimate(shape, 0, llama)
    assert estimate(shape, -1, engine).ram_bytes == estimate(shape, -1, llama).ram_bytes
    saved = estimate(shape, -1, llama).gpu_bytes - estimate(shape, -1, engine).gpu_bytes
    assert saved == graph_peak_bytes(shape, llama, 512) - graph_peak_bytes(shape, engine, 1) > 0


def test_slot_needs_are_built_once_per_slot_count_and_grow_with_slots():
    needs = slot_needs(shape_of(), EstimateOptions(4096))
    assert needs(2) is needs(2)
    assert [needs(s)(5).gpu_bytes for s in (1, 2, 3, 4)] == sorted({needs(s)(5).gpu_bytes for s in (1, 2, 3, 4)})
    assert needs(1)(0) == need_function(shape_of(), EstimateOptions(4096))(0)


def test_zero_slots_is_refused():
    with pytest.raises(EstimateError, match="n_slots"):
        EstimateOptions(4096, n_slots=0)


def test_a_calibration_compares_the_dry_run_with_the_estimate_at_the_dry_runs_slot_count():
    from orchestrator.calibration import calibration_from_dry_run

    shape = shape_of()
    four = estimate(shape, 0, EstimateOptions(4096, n_slots=4), gpu=False)
    total = four.gpu_bytes + four.ram_bytes + four.mmap_bytes
    dry = {"gpu_bytes": 0, "ram_bytes": int(1.1 * total) - four.mmap_bytes, "mmap_bytes": four.mmap_bytes,
           "n_slots": 4}
    cal = calibration_from_dry_run(shape, EstimateOptions(4096), 0, dry, "box", gpu=False)
    assert (cal.factor, cal.n_slots) == (pytest.approx(1.1, abs=1e-4), 4)
