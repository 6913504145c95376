"""The OpenAI API as the model server speaks it: request schemas and token text.

Requests are validated here (pydantic; the server turns a failure into a 400 naming the field).
Persona-ops extensions ride in the body (the ``openai`` client's ``extra_body``): ``steering``,
``adapter``, ``capping`` and ``monitor`` (see :mod:`persona_ops.inference.server`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports -9999.0 as well


# ----------------------------------------------------------------------------- token text

@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to 256+i."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


class TokenBytes:
    """The raw bytes of single tokens (a token can be part of a multi-byte character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.byte_level = any(t.startswith("Ġ") for t in vocab) and not any(t.startswith("▁") for t in vocab)
        self._cache: dict[int, bytes] = {}

    def __call__(self, token_id: int) -> bytes:
        if token_id not in self._cache:
            self._cache[token_id] = self._compute(token_id)
        return self._cache[token_id]

    def _compute(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str):
            table = _byte_level_decoder()
            if self.byte_level and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            if piece.startswith("<0x") and piece.endswith(">") and len(piece) == 6:  # byte fallback
                return bytes([int(piece[3:5], 16)])
            if "▁" in piece:
                return piece.replace("▁", " ").encode("utf-8")
        return self.tokenizer.decode([token_id]).encode("utf-8")

    def entry(self, token_id: int, logprob: float, as_id: bool = False) -> dict:
        """A ``{token, logprob, bytes}`` record of the OpenAI logprobs schema (``as_id``: the token
        named ``token_id:N``)."""
        raw = self(token_id)
        name = f"token_id:{token_id}" if as_id else raw.decode("utf-8", errors="replace")
        return {"token": name, "logprob": max(logprob, MIN_LOGPROB), "bytes": list(raw)}


# ----------------------------------------------------------------------------- API schema

class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def as_dict(self) -> dict:
        """The message as a chat-template dict (text parts joined)."""
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # chat templates know "system", not OpenAI's newer "developer"
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class SteeringRequest(BaseModel):
    """One intervention of a request (persona-ops extension)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    vector: str
    layer: int  # 1..num_layers, checked against the model
    kind: Literal["add", "ablate", "cap"] = "add"
    coef: float = 1.0
    tau: float = 0.0
    positions: Literal["prompt", "response", "all"] = "response"


class MonitorRequest(BaseModel):
    """A projection to report per generated token (persona-ops extension): a served ``vector`` at
    ``layer``, or a served persona space's ``axis`` (at ``layer``, default the space's layer)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    vector: str | None = None
    axis: str | None = None
    layer: int | None = None
    threshold: float | None = None  # report the first token whose projection exceeds it

    @model_validator(mode="after")
    def _one_source(self) -> MonitorRequest:
        if (self.vector is None) == (self.axis is None):
            raise ValueError("give exactly one of vector and axis")
        if self.vector is not None and self.layer is None:
            raise ValueError("a vector monitor needs a layer")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # e.g. "user": accepted and ignored
    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=32)
    seed: int | None = None  # SEED_MIN..SEED_MAX, checked with a message naming the range
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    stream_options: StreamOptions | None = None
    steering: list[SteeringRequest] = Field(default_factory=list)
    adapter: str | None = None
    capping: bool | None = None  # None = the server's capping interventions, if it has any
    monitor: list[MonitorRequest] = Field(default_factory=list, max_length=16)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N" (as vLLM)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(GenerationRequest):
    """OpenAI's legacy completions: ``prompt`` as text(s) or token ids; ``max_tokens=0`` with
    ``echo`` scores the prompt only."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("expected a non-empty prompt (a string, strings, token ids or lists of token ids)")
        return prompt
