"""Rendering chats with a tokenizer's template, the one way prompts are built everywhere."""

from __future__ import annotations

from functools import lru_cache

_PROBE = "__SYSTEM_PROBE__"


def article(word: str) -> str:
    """``a`` or ``an`` for an English word (by its first letter)."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def persona_system_prompt(assistant_name: str, instruction: str) -> str:
    """persona_vectors' system prompt: ``You are a/an {name} assistant. {instruction}``."""
    return f"You are {article(assistant_name)} {assistant_name} assistant. {instruction}".strip()


@lru_cache(maxsize=32)
def _keeps_system(tokenizer) -> bool:
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
    if _keeps_system(tokenizer):
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return [{"role": "user", "content": f"{system}\n\n{user}"}]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    """The chat text up to and including the generation prompt (the ``prompt`` positions)."""
    kwargs = {}
    if "enable_thinking" in (getattr(tokenizer, "chat_template", None) or ""):
        kwargs["enable_thinking"] = False
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


def encode(tokenizer, text: str) -> list[int]:
    """Token ids without extra special tokens: a rendered template already has its BOS."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]
