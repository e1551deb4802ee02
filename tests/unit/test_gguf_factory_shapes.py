"""tests/gguf_factory.py SHAPES: the named shapes are those of the real models (the GPU
benchmark's figures stand for those models only if the tensors are theirs)."""

import pytest

from orchestrator.core.model_shape import shape_from_gguf
from tests.gguf_factory import SHAPES, write_gguf

# Parameter counts of the real models (Hugging Face, tied embeddings counted once)
REAL_PARAMS = {"llama3.2-1b": 1_235_814_400, "llama3.2-3b": 3_212_749_824, "gemma3-1b": 999_885_952}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_a_named_shape_has_its_real_models_parameters(tmp_path, name):
    path = write_gguf(tmp_path / f"{name}.gguf", weight_dtype="q8_0", sparse=True, **SHAPES[name])
    shape = shape_from_gguf(path)
    assert shape.n_params == REAL_PARAMS[name]
    assert shape.output_tied
    assert shape.n_ctx_train == SHAPES[name]["ctx"]
