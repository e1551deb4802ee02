"""Which chat template a loaded model uses: the GGUF's own, else the family fallback for
the configured `chat_format` or the architecture (worker/fallback_templates.py), else one
of llama-cpp-python's named formats (e.g. `llama-2`), adapted the same way."""

from __future__ import annotations

from collections.abc import Sequence

from worker.chat_template import (
    ChatTemplate,
    RenderedPrompt,
    TemplateCaps,
    TemplateError,
    adapt,
    fallback_template,
    family_for,
)

# Architectures without a family of ours: llama-cpp-python's named format.
LEGACY_ARCHITECTURE_FORMATS = {"llama": "llama-2"}


class NamedFormat:
    """A llama-cpp-python `format_*` function behind the ChatTemplate interface: it knows
    system, user and assistant turns; tools and tool turns are adapted into them."""

    caps = TemplateCaps(system=True, tools=False, tool_calls=False, tool_results=False, developer=False)
    tool_format = "json"

    def __init__(self, name: str) -> None:
        from llama_cpp import llama_chat_format

        candidates = (f"format_{name}", f"format_{name.replace('-', '_')}", f"format_{name.replace('-', '')}")
        fn = next((getattr(llama_chat_format, c) for c in candidates if hasattr(llama_chat_format, c)), None)
        if fn is None:
            raise ValueError(f"unknown chat_format {name!r}")
        self.name = name
        self._fn = fn

    def render(self, messages: Sequence[dict], tools: Sequence[dict] | None = None,
               add_generation_prompt: bool = True) -> RenderedPrompt:
        adapted, _ = adapt(list(messages), tools, self.caps)
        try:
            result = self._fn(messages=adapted)
        except Exception as exc:
            raise TemplateError(str(exc)) from None
        from worker.chat_template import _user_spans

        return RenderedPrompt(result.prompt, _user_spans(result.prompt, adapted), add_bos=not result.added_special)


def choose_formatter(llama, configured: str | None):
    metadata = llama.metadata
    bos, eos = _token_text(llama, llama.token_bos()), _token_text(llama, llama.token_eos())
    template = metadata.get("tokenizer.chat_template")
    if template:
        return ChatTemplate(template, bos, eos)
    architecture = metadata.get("general.architecture", "")
    family = family_for(configured, architecture)
    if family is not None:
        return fallback_template(family, bos, eos)
    return NamedFormat(configured or LEGACY_ARCHITECTURE_FORMATS.get(architecture, "chatml"))


def _token_text(llama, token_id: int) -> str:
    if token_id < 0:
        return ""
    return llama._model.token_get_text(token_id)
