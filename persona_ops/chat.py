"""Rendering chats with a tokenizer's template, the one way prompts are built everywhere."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Iterator

from persona_ops.errors import InputError

_PROBE = "__SYSTEM_PROBE__"
_THINKING: ContextVar[bool] = ContextVar("thinking", default=False)


def has_thinking_mode(tokenizer) -> bool:
    """Whether the chat template has a switchable thinking mode (Qwen3's ``enable_thinking``)."""
    return "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "")


@contextmanager
def thinking(on: bool) -> Iterator[None]:
    """Render chats inside the block with a reasoning model's thinking mode ``on`` (off elsewhere)."""
    token = _THINKING.set(on)
    try:
        yield
    finally:
        _THINKING.reset(token)


def article(word: str) -> str:
    """``a`` or ``an`` for an English word (by its first letter)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def persona_system_prompt(assistant_name: str, instruction: str) -> str:
    """persona_vectors' system prompt: ``You are a/an {name} assistant. {instruction}``."""
    return f"You are {article(assistant_name)} {assistant_name} assistant. {instruction}".strip()


@lru_cache(maxsize=32)
def keeps_system(tokenizer) -> bool:
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "system", "content": _PROBE}, {"role": "user", "content": "hi"}],
            tokenize=False, add_generation_prompt=True)
    except Exception:  # templates that raise on a system role
        return False
    return _PROBE in text


def chat_messages(tokenizer, system: str | None, user: str) -> list[dict]:
    """Messages for one turn; the system prompt is prefixed to the user turn when the
    template drops system messages."""
    if not system:
        return [{"role": "user", "content": user}]
    if keeps_system(tokenizer):
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{system}\n\n{user}"}]


def render(tokenizer, messages: list[dict], generation_prompt: bool = True) -> str:
    """The chat rendered with the tokenizer's template: every prompt, transcript, judge prompt,
    training example and served request goes through here. Templates with a thinking mode
    (Qwen3) render with it off, so the text is the same whoever renders it, unless inside
    :func:`thinking` (``True``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InputError("the tokenizer has no chat template; a chat (instruct) model is needed")
    kwargs = {}
    if has_thinking_mode(tokenizer):
        kwargs["enable_thinking"] = _THINKING.get()
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         **kwargs)


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat text up to and including the generation prompt (the ``prompt`` positions)."""
    return render(tokenizer, messages, generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of :func:`render_prompt`."""
    return encode(tokenizer, render_prompt(tokenizer, messages))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids without extra special tokens: a rendered template already has its BOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
