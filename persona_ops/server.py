"""A small OpenAI-compatible chat-completions server over a local model.

``persona-ops serve-model`` runs it, so anything that speaks the OpenAI API (the
``openai`` client, ``OpenAIJudge``, external tools) can use the embedded model or any
HF model. Supported: ``messages``, ``temperature`` (0 = greedy), ``top_p``,
``max_tokens`` / ``max_completion_tokens``, ``n``, ``seed`` (same seed, same output),
``logprobs``, ``top_logprobs`` (0-20) and ``stop``. No streaming, tools or penalties.

Logprobs: the chosen token's ``logprob`` and ``top_logprobs`` both come from the fp32
log-softmax of the model's raw logits at that position, i.e. **before** temperature
and top-p (the model's own distribution).

Requests are served one at a time (the model is not thread-safe). All sampling is in
``sample_chat``, which a faster engine can replace.

Persona-ops extensions (send them with the openai client's ``extra_body``):

- ``steering``: a list of ``{vector, layer, kind: add|ablate|cap, coef, tau, positions}``;
  ``vector`` names a vector the server was started with (``--vector NAME=FILE``), ``layer``
  is a hidden_states index (the output of block ``layer-1`` is edited).
- ``adapter``: the name of a LoRA adapter the server was started with (``--adapter NAME=DIR``).
"""

from __future__ import annotations

import inspect
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from persona_ops.errors import InputError
from persona_ops.judge.local import chat_token_ids
from persona_ops.models import EMBEDDED, LoadedModel

DEFAULT_MAX_TOKENS = 512
_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports -9999.0 as well


# ----------------------------------------------------------------------------- sampling

@dataclass
class GeneratedChoice:
    """One sampled completion: token ids, their logprobs and the top alternatives."""

    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut it
    finish_reason: str = "length"
    completion_tokens: int = 0  # generated tokens, a stopping end-of-sequence token included


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(loaded.model.generation_config, "eos_token_id", None),
                  loaded.tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def _cache_kwarg(model) -> str:
    """The forward() argument for the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _choose(logits: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # the first token always stays
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def sample_chat(loaded: LoadedModel, messages: list[dict], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                temperature: float = 1.0, top_p: float = 1.0, n: int = 1, seed: int | None = None,
                top_logprobs: int = 0, stop: list[str] | None = None, interventions=()
                ) -> tuple[list[GeneratedChoice], int]:
    """Sample ``n`` completions of a chat; return them and the number of prompt tokens.

    The ``n`` rows share one prompt (no padding) and one KV cache; a row stops at an
    end-of-sequence token, at a ``stop`` string (cut before it) or after ``max_tokens``.
    ``interventions`` (``persona_ops.interventions.Intervention``) steer prefill and decoding.
    """
    if interventions:
        from persona_ops.interventions import Steerer

        with Steerer(loaded.layers, interventions) as steerer:
            return _sample(loaded, messages, max_tokens, temperature, top_p, n, seed, top_logprobs, stop, steerer)
    return _sample(loaded, messages, max_tokens, temperature, top_p, n, seed, top_logprobs, stop, None)


def _sample(loaded, messages, max_tokens, temperature, top_p, n, seed, top_logprobs, stop, steerer):
    model, tokenizer = loaded.model, loaded.tokenizer
    prompt = chat_token_ids(tokenizer, messages)
    context = getattr(model.config, "max_position_embeddings", None) or 10 ** 9
    budget = min(max_tokens, context - len(prompt))
    if budget < 1:
        raise InputError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
    device = loaded.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else random.getrandbits(63))
    eos = _eos_ids(loaded)
    stop = [s for s in (stop or []) if s]

    choices = [GeneratedChoice() for _ in range(n)]
    done = [False] * n
    cache_arg = _cache_kwarg(model)
    if steerer is not None:  # prefill: every prompt position; the last one predicts the response
        prompt_mask = torch.ones(n, len(prompt), dtype=torch.bool)
        response_mask = torch.zeros_like(prompt_mask)
        response_mask[:, -1] = True
        steerer.set_positions(prompt_mask, response_mask)
    out = model(input_ids=torch.tensor([prompt] * n, device=device), use_cache=True, logits_to_keep=1)
    if steerer is not None:
        steerer.set_decode()
    for _ in range(budget):
        logits = out.logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        chosen = _choose(logits, temperature, top_p, generator)
        top_lp, top_ids = (logp.topk(top_logprobs, dim=-1) if top_logprobs else (None, None))
        for i, choice in enumerate(choices):
            if done[i]:
                continue
            token = int(chosen[i])
            choice.completion_tokens += 1
            if token in eos:
                choice.finish_reason, done[i] = "stop", True
                continue
            choice.token_ids.append(token)
            choice.logprobs.append(float(logp[i, token]))
            if top_logprobs:
                choice.top.append(list(zip(top_ids[i].tolist(), top_lp[i].tolist())))
            if stop and _cut_at_stop(tokenizer, choice, stop):
                choice.finish_reason, done[i] = "stop", True
        if all(done):
            break
        kv = out["cache"] if "cache" in out else out["past_key_values"]
        out = model(input_ids=chosen[:, None], use_cache=True, **{cache_arg: kv})
    for choice in choices:
        if choice.text is None:
            choice.text = tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    return choices, len(prompt)


def _cut_at_stop(tokenizer, choice: GeneratedChoice, stop: list[str]) -> bool:
    """If the text contains a stop string, cut it (and tokens after it) off; report whether it did."""
    text = tokenizer.decode(choice.token_ids, skip_special_tokens=True)
    hits = [text.index(s) for s in stop if s in text]
    if not hits:
        return False
    choice.text = text[:min(hits)]
    # keep the tokens that start before the cut
    keep = 0
    while keep < len(choice.token_ids) and len(
            tokenizer.decode(choice.token_ids[:keep], skip_special_tokens=True)) < len(choice.text):
        keep += 1
    del choice.token_ids[keep:], choice.logprobs[keep:], choice.top[keep:]
    return True


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

    def entry(self, token_id: int, logprob: float) -> dict:
        """A ``{token, logprob, bytes}`` record of the OpenAI logprobs schema."""
        raw = self(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(logprob, _MIN_LOGPROB),
                "bytes": list(raw)}


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

    model_config = ConfigDict(extra="forbid")
    vector: str
    layer: int = Field(ge=1)
    kind: Literal["add", "ablate", "cap"] = "add"
    coef: float = 1.0
    tau: float = 0.0
    positions: Literal["prompt", "response", "all"] = "response"


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. "user": accepted and ignored
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=32)
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    steering: list[SteeringRequest] = Field(default_factory=list)
    adapter: str | None = None


def _error(status: int, message: str, param: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    """An error response in OpenAI's format (the ``openai`` client raises the matching error)."""
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


def create_app(loaded: LoadedModel, vectors: dict | None = None, adapters: dict | None = None) -> FastAPI:
    """A FastAPI app serving ``loaded`` under ``/v1`` (models, chat completions).

    ``vectors``: name -> ``[num_layers + 1, hidden]`` tensor usable in ``steering``;
    ``adapters``: name -> LoRA checkpoint directory usable as ``adapter``.
    """
    app = FastAPI(title="persona-ops model server")
    vectors, adapters = dict(vectors or {}), dict(adapters or {})
    current = {"adapter": None, "model": loaded}  # the adapter applied now (switched per request)
    lock = threading.Lock()
    token_bytes = TokenBytes(loaded.tokenizer)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"{loc or 'request'}: {first.get('msg', 'invalid request')}", loc or None)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError):
        return _error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail),
                      kind="not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list",
                "data": [{"id": loaded.label, "object": "model", "created": created, "owned_by": "persona-ops"}]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest):
        if req.stream:
            return _error(400, "stream=true is not supported by this server", "stream")
        if req.top_logprobs and not req.logprobs:
            return _error(400, "top_logprobs requires logprobs=true", "top_logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            return _error(400, "stop: at most 4 sequences", "stop")
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        if req.adapter is not None and req.adapter not in adapters:
            return _error(400, f"adapter {req.adapter!r} unknown; served: {sorted(adapters)}", "adapter")
        interventions = []
        for i, st in enumerate(req.steering):
            if st.vector not in vectors:
                return _error(400, f"steering[{i}].vector {st.vector!r} unknown; served: {sorted(vectors)}",
                              f"steering.{i}.vector")
            if st.layer >= vectors[st.vector].shape[0]:
                return _error(400, f"steering[{i}].layer {st.layer}: expected 1..{vectors[st.vector].shape[0] - 1}",
                              f"steering.{i}.layer")
            from persona_ops.interventions import Intervention

            interventions.append(Intervention(st.kind, st.layer, vectors[st.vector][st.layer], coef=st.coef,
                                              tau=st.tau, positions=st.positions))
        with lock:
            model = _switch_adapter(current, loaded, adapters, req.adapter)
            choices, prompt_tokens = sample_chat(
                model, [m.as_dict() for m in req.messages], interventions=interventions,
                max_tokens=req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
                temperature=req.temperature, top_p=req.top_p, n=req.n, seed=req.seed,
                top_logprobs=top_k, stop=stop)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": loaded.label,
            "system_fingerprint": None,
            "choices": [_choice_json(i, c, req.logprobs, top_k, token_bytes) for i, c in enumerate(choices)],
            "usage": {"prompt_tokens": prompt_tokens,
                      "completion_tokens": sum(c.completion_tokens for c in choices),
                      "total_tokens": prompt_tokens + sum(c.completion_tokens for c in choices)},
        }

    return app


def _switch_adapter(current: dict, base: LoadedModel, adapters: dict, name: str | None) -> LoadedModel:
    """The model for a request: the base, or the base with adapter ``name`` (loaded on change)."""
    if current["adapter"] != name:
        from persona_ops.training import load_adapter_checkpoint, unload_adapter

        plain = unload_adapter(current["model"]) if current["adapter"] else base
        current["model"] = load_adapter_checkpoint(plain, adapters[name]) if name else plain
        current["adapter"] = name
    return current["model"]


def _choice_json(index: int, choice: GeneratedChoice, logprobs: bool, top_k: int,
                 token_bytes: TokenBytes) -> dict:
    content = None
    if logprobs:
        content = [{**token_bytes.entry(tok, lp),
                    "top_logprobs": [token_bytes.entry(t, l) for t, l in choice.top[j]] if top_k else []}
                   for j, (tok, lp) in enumerate(zip(choice.token_ids, choice.logprobs))]
    return {"index": index,
            "message": {"role": "assistant", "content": choice.text},
            "finish_reason": choice.finish_reason,
            "logprobs": {"content": content, "refusal": None} if logprobs else None}


def serve(model: str = EMBEDDED, revision: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          dtype: str = "auto", device: str = "auto", vectors: dict[str, str] | None = None,
          adapters: dict[str, str] | None = None, aggregate: str = "response_avg") -> None:
    """Load ``model`` (and the named vector files' ``aggregate`` tensors) and serve it with
    uvicorn at ``http://host:port/v1`` until interrupted."""
    import uvicorn

    from persona_ops.models import load_model
    from persona_ops.vectors import load_vectors

    tensors = {}
    for name, path in (vectors or {}).items():
        vecs, _ = load_vectors(path)
        if aggregate not in vecs:
            raise InputError(f"{path}: no {aggregate!r} tensor (has {sorted(vecs)})")
        tensors[name] = vecs[aggregate]
    loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    uvicorn.run(create_app(loaded, tensors, adapters), host=host, port=port, log_level="info")
