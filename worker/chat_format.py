"""How chat messages become a prompt: the GGUF's own template, else the configured
format, else the architecture's usual one (Gemma's turns for gemma3, ChatML for qwen2)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

# Usual chat format of an architecture when its GGUF carries no template.
ARCHITECTURE_FORMATS = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
    "llama": "llama-2",
    "mistral": "mistral-instruct",
    "phi3": "chatml",
    "falcon": "chatml",
    "mpt": "chatml",
    "deepseek2": "chatml",
}


@dataclass(frozen=True)
class FormattedPrompt:
    prompt: str
    stop: list[str]
    add_bos: bool


@dataclass(frozen=True)
class ChatFormatter:
    name: str
    format_fn: Callable[[list[dict]], FormattedPrompt]

    def format(self, messages: list[dict]) -> FormattedPrompt:
        return self.format_fn(messages)


def _stops(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _from_template(llama, template: str) -> ChatFormatter:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def token_text(token_id: int) -> str:
        if token_id < 0:
            return ""
        return llama._model.token_get_text(token_id)

    eos_id, bos_id = llama.token_eos(), llama.token_bos()
    jinja = Jinja2ChatFormatter(
        template=template, eos_token=token_text(eos_id), bos_token=token_text(bos_id), stop_token_ids=[eos_id]
    )

    def fmt(messages: list[dict]) -> FormattedPrompt:
        result = jinja(messages=messages)
        return FormattedPrompt(result.prompt, _stops(result.stop), add_bos=not result.added_special)

    return ChatFormatter("gguf-template", fmt)


def _named(name: str) -> ChatFormatter:
    from llama_cpp import llama_chat_format

    candidates = (f"format_{name}", f"format_{name.replace('-', '_')}", f"format_{name.replace('-', '')}")
    fn = next((getattr(llama_chat_format, c) for c in candidates if hasattr(llama_chat_format, c)), None)
    if fn is None:
        raise ValueError(f"unknown chat_format {name!r}")

    def fmt(messages: list[dict]) -> FormattedPrompt:
        result = fn(messages=messages)
        return FormattedPrompt(result.prompt, _stops(result.stop), add_bos=not result.added_special)

    return ChatFormatter(name, fmt)


def choose_formatter(llama, configured: str | None) -> ChatFormatter:
    template = llama.metadata.get("tokenizer.chat_template")
    if template:
        return _from_template(llama, template)
    if configured:
        return _named(configured)
    arch = llama.metadata.get("general.architecture", "")
    return _named(ARCHITECTURE_FORMATS.get(arch, "chatml"))
