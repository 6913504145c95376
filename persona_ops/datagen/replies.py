"""Asking the model and checking its replies: a reply that fails :mod:`persona_ops.data`'s
validation is an :class:`~persona_ops.inference.openai_client.UnusableReply` (retried by the
endpoint, then reported with what was wrong)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.data import load_chat_dataset, load_questions, load_trait
from persona_ops.errors import InputError
from persona_ops.inference.openai_client import OpenAIEndpoint, UnusableReply
from persona_ops.names import printable
from persona_ops.resumable import chunk_seed

T = TypeVar("T")
_FENCE = re.compile(r"\A\s*```[a-zA-Z]*\n(.*)\n```\s*\Z", re.DOTALL)
_SHOWN = 60  # characters of a bad reply quoted in the error
_PROBLEMS_SHOWN = 3


class DatagenCfg(BaseModel):
    """The model that writes the data (an OpenAI-compatible endpoint, as ``EndpointCfg`` in
    params.yaml), and how it is sampled and chunked."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = None  # None = https://api.openai.com/v1
    model: str = "gpt-4.1-mini"
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    max_concurrency: int = Field(16, ge=1)
    max_retries: int = Field(5, ge=0)
    timeout: float = Field(300.0, gt=0)
    backoff_base: float = Field(1.0, ge=0)
    backoff_max: float = Field(60.0, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    max_tokens: int = Field(4000, ge=1)
    seed: int = Field(0, ge=0)
    chunk_size: int = Field(16, ge=1)
    resume: bool = True  # off: start over

    def endpoint(self, who: str) -> OpenAIEndpoint:
        return OpenAIEndpoint(who, self.model, self.base_url, self.api_key_env, self.max_concurrency,
                              self.max_retries, self.timeout, self.backoff_base, self.backoff_max)

    def settings(self) -> dict:
        """What generated records depend on (the key's variable name is not among them)."""
        return {"model": self.model, "base_url": self.base_url, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "seed": self.seed, "chunk_size": self.chunk_size}


def asker(cfg: DatagenCfg, check: Callable[[str], T], json_reply: bool):
    """A request function for :meth:`OpenAIEndpoint.map`: ``(key, prompt)`` -> ``check(reply text)``,
    seeded by the key (a rerun sends the same request)."""

    async def ask(client, job: tuple[str, str]) -> T:
        key, prompt = job
        extra = {"response_format": {"type": "json_object"}} if json_reply else {}
        resp = await client.chat.completions.create(
            model=cfg.model, messages=[{"role": "user", "content": prompt}], temperature=cfg.temperature,
            max_tokens=cfg.max_tokens, seed=chunk_seed(cfg.seed, key, 0), **extra)
        if not getattr(resp, "choices", None):
            raise UnusableReply("reply: no choices, expected a chat completion")
        text = resp.choices[0].message.content
        if not text or not text.strip():
            raise UnusableReply("reply: empty, expected text")
        return check(text)

    return ask


def parse_json(text: str, expected: str) -> Any:
    """The JSON of a reply (a surrounding code fence tolerated), or :class:`UnusableReply`."""
    m = _FENCE.match(text)
    body = m.group(1) if m else text
    try:
        return json.loads(body)
    except json.JSONDecodeError as e:
        shown = printable(body.strip()[:_SHOWN]) + ("..." if len(body.strip()) > _SHOWN else "")
        raise UnusableReply(f"reply: not JSON ({e.msg}), expected {expected}; got {shown!r}") from None


def validated(fmt: str, value: Any, stem: str = "reply") -> Any:
    """``value`` checked as a ``trait`` file, ``questions`` or ``chat`` records (a list) by the
    project's own loaders, or :class:`UnusableReply` naming the first problems."""
    loader, suffix = {"trait": (load_trait, ".json"), "questions": (load_questions, ".jsonl"),
                      "chat": (load_chat_dataset, ".jsonl")}[fmt]
    text = json.dumps(value, ensure_ascii=False, indent=1) + "\n" if suffix == ".json" else \
        "".join(json.dumps(v, ensure_ascii=False) + "\n" for v in value)
    with tempfile.TemporaryDirectory(prefix="persona-ops-reply-") as tmp:
        path = Path(tmp) / f"{stem}{suffix}"
        path.write_text(text, encoding="utf-8")
        try:
            return loader(path)
        except InputError as e:
            lines = str(e).replace(str(path), "reply").splitlines()
            more = f"; {len(lines) - _PROBLEMS_SHOWN} more" if len(lines) > _PROBLEMS_SHOWN else ""
            raise UnusableReply("; ".join(lines[:_PROBLEMS_SHOWN]) + more) from None


def field_of(obj: Any, name: str, expected: str) -> Any:
    """``obj[name]`` of a reply that must be a JSON object holding it."""
    if not isinstance(obj, dict) or name not in obj:
        got = f"an object without {name!r}" if isinstance(obj, dict) else type(obj).__name__
        raise UnusableReply(f"reply: {name}: missing, expected {expected}; got {got}")
    return obj[name]
