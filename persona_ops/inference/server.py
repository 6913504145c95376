"""A small OpenAI-compatible chat-completions server over a local model.

``persona-ops serve-model`` runs it, so anything that speaks the OpenAI API (the
``openai`` client, ``OpenAIJudge``, external tools) can use the embedded model or any
HF model. Supported: ``messages``, ``temperature`` (0 = greedy), ``top_p``,
``max_tokens`` / ``max_completion_tokens``, ``n``, ``seed`` (same seed, same output),
``logprobs``, ``top_logprobs`` (0-20) and ``stop``. No streaming, tools or penalties.

Logprobs: the chosen token's ``logprob`` and ``top_logprobs`` both come from the fp32
log-softmax of the model's raw logits at that position, i.e. **before** temperature
and top-p (the model's own distribution).

Requests are served one at a time (the model is not thread-safe). Completions come from
the generation engine (``persona_ops.inference.engine``, the one local generation path); logprobs
are recomputed by teacher forcing (see ``_score_choices``).

Persona-ops extensions (send them with the openai client's ``extra_body``):

- ``steering``: a list of ``{vector, layer, kind: add|ablate|cap, coef, tau, positions}``;
  ``vector`` names a vector the server was started with (``--vector NAME=FILE``), ``layer``
  is a hidden_states index (the output of block ``layer-1`` is edited).
- ``adapter``: the name of a LoRA adapter the server was started with (``--adapter NAME=DIR``).
- ``capping``: ``false`` turns off the server's activation capping (``--capping FILE``, on for
  every request by default; applied after the request's ``steering``).
"""

from __future__ import annotations

import contextlib
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

from persona_ops.chat import prompt_ids
from persona_ops.errors import InputError
from persona_ops.models.loading import EMBEDDED, LoadedModel

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


def sample_chat(loaded: LoadedModel, messages: list[dict], *, max_tokens: int = DEFAULT_MAX_TOKENS,
                temperature: float = 1.0, top_p: float = 1.0, n: int = 1, seed: int | None = None,
                logprobs: bool = False, top_logprobs: int = 0, stop: list[str] | None = None, interventions=()
                ) -> tuple[list[GeneratedChoice], int]:
    """Sample ``n`` completions of a chat on the generation engine; return them and the number
    of prompt tokens.

    The ``n`` rows share one prompt and one seeded generator (a random seed when ``seed`` is
    None); a row stops at an end-of-sequence token, at a ``stop`` string (cut before it) or
    after ``max_tokens``. ``interventions`` (``persona_ops.interp.interventions.Intervention``) steer
    prefill and decoding. ``logprobs``: see :func:`_score_choices`.
    """
    from persona_ops.inference.engine import generate_tokens, stop_ids
    from persona_ops.inference.sampling import SamplingParams

    tokenizer = loaded.tokenizer
    prompt = prompt_ids(tokenizer, messages)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 10 ** 9
    budget = min(max_tokens, context - len(prompt))
    if budget < 1:
        raise InputError(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
    eos = set(stop_ids(loaded))
    sampling = SamplingParams(budget, temperature, top_p, seed if seed is not None else random.getrandbits(63))
    rows = generate_tokens(loaded, [prompt] * n, sampling, interventions, eos_ids=sorted(eos), batch_size=n)
    stop = [s for s in (stop or []) if s]
    choices = []
    for row in rows:
        ended = bool(row) and row[-1] in eos  # the engine keeps a row's end-of-sequence token
        choice = GeneratedChoice(token_ids=row[:-1] if ended else list(row), completion_tokens=len(row),
                                 finish_reason="stop" if ended else "length")
        if not (stop and _cut_at_stop(tokenizer, choice, stop)):
            choice.text = tokenizer.decode(choice.token_ids, skip_special_tokens=True)
        choices.append(choice)
    if logprobs:
        _score_choices(loaded, prompt, choices, top_logprobs, interventions)
    return choices, len(prompt)


@torch.inference_mode()
def _score_choices(loaded: LoadedModel, prompt: list[int], choices: list[GeneratedChoice], top_k: int,
                   interventions=()) -> None:
    """Fill each choice's ``logprobs`` (and ``top`` when ``top_k``) by teacher forcing.

    The engine returns token ids only, so the logprobs are recomputed: one forward over
    ``prompt + tokens[:-1]`` per choice, with the same interventions at the same positions
    (prompt = the prompt tokens, response = the last prompt token and the tokens fed back,
    as during cached decoding), gives at position ``len(prompt) - 1 + j`` the logits that
    predicted token ``j``. Causal attention makes these the logits the sampler saw (up to
    floating-point differences between cached and full attention). Logprobs are the fp32
    log-softmax of those raw logits, i.e. before temperature and top-p.
    """
    from persona_ops.interp.interventions import Steerer, teacher_forced_masks

    loaded.activate()
    steerer = Steerer(loaded.layers, interventions) if interventions else None
    with steerer if steerer is not None else contextlib.nullcontext():
        for choice in choices:
            tokens = choice.token_ids
            if not tokens:
                continue
            ids = torch.tensor([prompt + tokens[:-1]], device=loaded.device)
            if steerer is not None:
                steerer.set_positions(*teacher_forced_masks(torch.ones_like(ids), [len(prompt)]))
            logits = loaded.model(input_ids=ids, logits_to_keep=len(tokens)).logits[0, -len(tokens):]
            logp = torch.log_softmax(logits.float(), dim=-1)
            choice.logprobs = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
            if top_k:
                values, indices = logp.topk(top_k, dim=-1)
                choice.top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


def _cut_at_stop(tokenizer, choice: GeneratedChoice, stop: list[str]) -> bool:
    """Cut the completion where a stop string first appears (tokens after the cut go too), as
    if generation had stopped at the token that completed it; report whether it did."""
    full = choice.token_ids
    text = tokenizer.decode(full, skip_special_tokens=True)
    if not any(s in text for s in stop):
        return False
    for end in range(1, len(full) + 1):  # generation would have ended with the token completing a stop
        text = tokenizer.decode(full[:end], skip_special_tokens=True)
        if any(s in text for s in stop):
            break
    choice.text = text[:min(text.index(s) for s in stop if s in text)]
    keep = 0  # the tokens that start before the cut
    while keep < end and len(tokenizer.decode(full[:keep], skip_special_tokens=True)) < len(choice.text):
        keep += 1
    choice.token_ids = full[:keep]
    choice.finish_reason, choice.completion_tokens = "stop", end
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
    capping: bool | None = None  # None = the server's capping interventions, if it has any


def _error(status: int, message: str, param: str | None = None,
           kind: str = "invalid_request_error") -> JSONResponse:
    """An error response in OpenAI's format (the ``openai`` client raises the matching error)."""
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": None}})


def create_app(loaded: LoadedModel, vectors: dict | None = None, adapters: dict | None = None,
               capping: list | None = None) -> FastAPI:
    """A FastAPI app serving ``loaded`` under ``/v1`` (models, chat completions).

    ``vectors``: name -> ``[num_layers + 1, hidden]`` tensor usable in ``steering``;
    ``adapters``: name -> LoRA checkpoint directory usable as ``adapter``;
    ``capping``: interventions applied to every request unless it sends ``capping: false``
    (``persona_ops.interp.capping.CappingSpec.interventions()``).
    """
    app = FastAPI(title="persona-ops model server")
    vectors, adapters = dict(vectors or {}), dict(adapters or {})
    pool, base = _pool_of(loaded)  # adapters attached once, switched per request
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
            from persona_ops.interp.interventions import Intervention

            interventions.append(Intervention(st.kind, st.layer, vectors[st.vector][st.layer], coef=st.coef,
                                              tau=st.tau, positions=st.positions))
        if req.capping and not capping:
            return _error(400, "capping: this server has no capping spec (serve-model --capping FILE)", "capping")
        if req.capping is not False:
            interventions += capping or []  # last: the cap holds whatever the request steers
        with lock:
            model = pool.get(base.resolved(adapters[req.adapter]) if req.adapter else base)
            choices, prompt_tokens = sample_chat(
                model, [m.as_dict() for m in req.messages], interventions=interventions,
                max_tokens=req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
                temperature=req.temperature, top_p=req.top_p, n=req.n, seed=req.seed,
                logprobs=req.logprobs, top_logprobs=top_k, stop=stop)
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


def _pool_of(loaded: LoadedModel):
    """A model pool holding the served base model, and the reference naming it."""
    from persona_ops.models.pool import ModelPool
    from persona_ops.models.refs import ModelRef

    base = ModelRef(name=loaded.label)
    pool = ModelPool()
    pool.add(base, loaded)
    return pool, base


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
          adapters: dict[str, str] | None = None, aggregate: str = "response_avg",
          capping: str | None = None) -> None:
    """Load ``model`` (and the named vector files' ``aggregate`` tensors, and the capping spec
    file ``capping``) and serve it with uvicorn at ``http://host:port/v1`` until interrupted."""
    import uvicorn

    from persona_ops.interp.vectors import load_vectors
    from persona_ops.kernels.cpu_linear import packed_linears
    from persona_ops.models.loading import load_model

    tensors = {}
    for name, path in (vectors or {}).items():
        vecs, _ = load_vectors(path)
        if aggregate not in vecs:
            raise InputError(f"{path}: no {aggregate!r} tensor (has {sorted(vecs)})")
        tensors[name] = vecs[aggregate]
    spec = None
    if capping:
        from persona_ops.interp.capping import load_capping

        spec = load_capping(capping)  # a bad file fails before the model loads
    loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    if spec is not None:
        spec.check_fits(loaded.num_layers, loaded.hidden_size, capping)
    with packed_linears(loaded.model):  # packed once for the server's lifetime, not per request
        uvicorn.run(create_app(loaded, tensors, adapters, capping=spec.interventions() if spec else None),
                    host=host, port=port, log_level="info")
