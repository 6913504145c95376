"""A small OpenAI-compatible chat-completions server over a local model.

``persona-ops serve-model`` runs it, so anything that speaks the OpenAI API (the
``openai`` client, ``OpenAIJudge``, external tools) can use the embedded model or any
HF model. Supported: ``messages``, ``temperature`` (0 = greedy), ``top_p``,
``max_tokens`` / ``max_completion_tokens``, ``n``, ``seed`` (same seed, same output),
``logprobs``, ``top_logprobs`` (0-20) and ``stop``. No streaming, tools or penalties.

Logprobs: the chosen token's ``logprob`` and ``top_logprobs`` both come from the fp32
log-softmax of the model's raw logits at that position, i.e. **before** temperature
and top-p (the model's own distribution).

Requests are served one at a time (the model is not thread-safe); at most ``max_queue`` more wait
for the model, and a request beyond them gets 429 with ``Retry-After`` (``persona_ops.inference.admission``).
Completions come from the generation engine (``persona_ops.inference.engine``, the one local
generation path); logprobs are recomputed by teacher forcing (see ``_score_choices``).

Persona-ops extensions (send them with the openai client's ``extra_body``):

- ``steering``: a list of ``{vector, layer, kind: add|ablate|cap, coef, tau, positions}``;
  ``vector`` names a vector the server was started with (``--vector NAME=FILE``), ``layer``
  is a hidden_states index (the output of block ``layer-1`` is edited).
- ``adapter``: the name of a LoRA adapter the server was started with (``--adapter NAME=DIR``).
- ``capping``: ``false`` turns off the server's activation capping (``--capping FILE``, on for
  every request by default; applied after the request's ``steering``).

``model`` names the served model (its id in ``/v1/models``) or one of its adapters (listed there
with the model as ``parent``; the same as sending ``adapter``); another name gets 404
``model_not_found``. With an API key (``--api-key`` or ``PERSONA_OPS_SERVER_API_KEY``) every path
wants ``Authorization: Bearer KEY`` (401 otherwise). Limits (:class:`ServerLimits`): prompt plus
``max_tokens`` within the model's context, and ``n`` x (prompt + ``max_tokens``) within
``max_request_tokens`` (the KV cache one request reserves); 400 beyond either.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
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
from persona_ops.inference.admission import Admission, AdmissionMiddleware
from persona_ops.models.loading import EMBEDDED, LoadedModel

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 512
API_KEY_ENV = "PERSONA_OPS_SERVER_API_KEY"
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1  # int64, as OpenAI's API
_MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI reports -9999.0 as well


@dataclass(frozen=True)
class ServerLimits:
    """What one request, and all of them together, may hold."""

    max_queue: int = 16  # requests waiting for the model besides the one generating; more get 429
    max_request_tokens: int = 32768  # n x (prompt + max_tokens): the KV cache rows one request reserves
    max_body_bytes: int = 8 << 20
    retry_after_s: int = 1


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


def sample_chat(loaded: LoadedModel, messages: list[dict], *, max_tokens: int | None = None,
                temperature: float = 1.0, top_p: float = 1.0, n: int = 1, seed: int | None = None,
                logprobs: bool = False, top_logprobs: int = 0, stop: list[str] | None = None, interventions=(),
                max_request_tokens: int | None = None) -> tuple[list[GeneratedChoice], int]:
    """Sample ``n`` completions of a chat on the generation engine; return them and the number
    of prompt tokens.

    The ``n`` rows share one prompt and one seeded generator (a random seed when ``seed`` is
    None); a row stops at an end-of-sequence token, at a ``stop`` string (cut before it) or
    after ``max_tokens`` (default: ``DEFAULT_MAX_TOKENS``, fewer where the context ends). ``interventions``
    (``persona_ops.interp.interventions.Intervention``) steer prefill and decoding. ``logprobs``: see
    :func:`_score_choices`. InputError (before any generation) when the request does not fit: see
    :func:`token_budget`.
    """
    from persona_ops.inference.engine import generate_tokens, stop_ids
    from persona_ops.inference.sampling import SamplingParams

    tokenizer = loaded.tokenizer
    prompt = prompt_ids(tokenizer, messages)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 10 ** 9
    budget = token_budget(len(prompt), max_tokens, n, context, max_request_tokens)
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


def token_budget(prompt_tokens: int, max_tokens: int | None, n: int, context: int,
                 max_request_tokens: int | None = None) -> int:
    """The tokens each of ``n`` rows may generate; InputError when the prompt and ``max_tokens`` exceed
    the ``context``, or when the rows' KV cache, ``n`` x (prompt + budget) tokens, exceeds ``max_request_tokens``."""
    if max_tokens is None:
        budget = min(DEFAULT_MAX_TOKENS, context - prompt_tokens)
        if budget < 1:
            raise InputError(f"messages: the prompt has {prompt_tokens} tokens; the model's context is {context}")
    elif prompt_tokens + max_tokens > context:
        raise InputError(f"max_tokens: the prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceed "
                         f"the model's context of {context} tokens")
    else:
        budget = max_tokens
    reserved = n * (prompt_tokens + budget)
    if max_request_tokens is not None and reserved > max_request_tokens:
        raise InputError(f"n x (prompt + max_tokens) = {n} x ({prompt_tokens} + {budget}) = {reserved} tokens of KV "
                         f"cache; this server's limit is {max_request_tokens} tokens: lower n or max_tokens")
    return budget


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

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    vector: str
    layer: int  # 1..num_layers, checked against the model
    kind: Literal["add", "ablate", "cap"] = "add"
    coef: float = 1.0
    tau: float = 0.0
    positions: Literal["prompt", "response", "all"] = "response"


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)  # e.g. "user": accepted and ignored
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=32)
    seed: int | None = None  # SEED_MIN..SEED_MAX, checked with a message naming the range
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    stop: str | list[str] | None = Field(None)
    stream: bool = False
    steering: list[SteeringRequest] = Field(default_factory=list)
    adapter: str | None = None
    capping: bool | None = None  # None = the server's capping interventions, if it has any


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """An error response in OpenAI's format (the ``openai`` client raises the matching error)."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _refusal(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    """The admission middleware's answer: 429 (server full) or 413 (body too large)."""
    busy = status == 429
    return _error(status, message, kind="rate_limit_error" if busy else "invalid_request_error",
                  code="rate_limit_exceeded" if busy else None, headers=headers)


def check_vector(tensor: torch.Tensor, num_layers: int, hidden_size: int, source: str) -> None:
    """InputError unless ``tensor`` is a finite ``[num_layers + 1, hidden_size]`` tensor (a vector per layer)."""
    expected = [num_layers + 1, hidden_size]
    if list(tensor.shape) != expected:
        raise InputError(f"{source}: expected a {expected} tensor ([num_layers + 1, hidden] for a model of "
                         f"{num_layers} layers and hidden size {hidden_size}), found {list(tensor.shape)}; "
                         "was it made for another model?")
    if not torch.isfinite(tensor).all():
        raise InputError(f"{source}: NaN or infinite values")


def _key_matches(authorization: str | None, api_key: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer api_key``, compared in constant time
    (digests of equal length, so not even the key's length leaks)."""
    scheme, _, token = (authorization or "").partition(" ")
    presented, expected = (hashlib.sha256(t.encode()).digest() for t in (token.strip(), api_key))
    return hmac.compare_digest(presented, expected) and scheme.lower() == "bearer"


def create_app(loaded: LoadedModel, vectors: dict | None = None, adapters: dict | None = None,
               capping: list | None = None, *, api_key: str | None = None, served_name: str | None = None,
               limits: ServerLimits = ServerLimits()) -> FastAPI:
    """A FastAPI app serving ``loaded`` under ``/v1`` (models, chat completions).

    ``vectors``: name -> ``[num_layers + 1, hidden]`` tensor usable in ``steering``;
    ``adapters``: name -> LoRA checkpoint directory usable as ``adapter`` or ``model``;
    ``capping``: interventions applied to every request unless it sends ``capping: false``
    (``persona_ops.interp.capping.CappingSpec.interventions()``); ``api_key``: the bearer token
    every request must send (None: none); ``served_name``: the model's id in ``/v1/models``
    (default: its label). ``app.state.admission`` counts the chat requests inside.
    """
    app = FastAPI(title="persona-ops model server")
    vectors, adapters = dict(vectors or {}), dict(adapters or {})
    for name, tensor in vectors.items():
        check_vector(tensor, loaded.num_layers, loaded.hidden_size, f"vector {name!r}")
    served_name = served_name or loaded.label
    if served_name in adapters:
        raise InputError(f"adapter {served_name!r}: the served model has that name already")
    pool, base = _pool_of(loaded)  # adapters attached once, switched per request
    lock = threading.Lock()
    token_bytes = TokenBytes(loaded.tokenizer)
    created = int(time.time())
    app.state.admission = Admission(capacity=1 + limits.max_queue)
    app.add_middleware(AdmissionMiddleware, admission=app.state.admission, paths={"/v1/chat/completions"},
                       max_body_bytes=limits.max_body_bytes, retry_after_s=limits.retry_after_s, refuse=_refusal)

    @app.middleware("http")  # added last, so it runs first: a request without the key is never admitted
    async def _authenticate(request: Request, call_next):
        if api_key is None or _key_matches(request.headers.get("authorization"), api_key):
            return await call_next(request)
        missing = "authorization" not in request.headers
        return _error(401, "missing API key: send Authorization: Bearer KEY" if missing else "incorrect API key",
                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

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
        entry = {"object": "model", "created": created, "owned_by": "persona-ops"}
        return {"object": "list", "data": [{"id": served_name, **entry},
                                           *({"id": name, **entry, "parent": served_name} for name in adapters)]}

    @app.post("/v1/chat/completions")
    def chat_completions(req: ChatCompletionRequest):
        if req.stream:
            return _error(400, "stream=true is not supported by this server", "stream")
        if req.model is not None and req.model != served_name and req.model not in adapters:
            return _error(404, f"model {req.model!r} is not served here; served: {[served_name, *adapters]}",
                          "model", code="model_not_found")
        adapter = req.model if req.model in adapters else req.adapter
        if req.adapter is not None and req.adapter != adapter:
            return _error(400, f"adapter {req.adapter!r}: the request's model is the adapter {adapter!r}", "adapter")
        if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
            return _error(400, f"seed: expected an integer in -2**63..2**63-1, found {req.seed}", "seed")
        if req.top_logprobs and not req.logprobs:
            return _error(400, "top_logprobs requires logprobs=true", "top_logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            return _error(400, "stop: at most 4 sequences", "stop")
        top_k = (req.top_logprobs or 0) if req.logprobs else 0
        if adapter is not None and adapter not in adapters:
            return _error(400, f"adapter {adapter!r} unknown; served: {sorted(adapters)}", "adapter")
        interventions = []
        for i, st in enumerate(req.steering):
            if st.vector not in vectors:
                return _error(400, f"steering[{i}].vector {st.vector!r} unknown; served: {sorted(vectors)}",
                              f"steering.{i}.vector")
            if not 1 <= st.layer <= loaded.num_layers:
                return _error(400, f"steering[{i}].layer {st.layer}: expected 1..{loaded.num_layers}",
                              f"steering.{i}.layer")
            from persona_ops.interp.interventions import Intervention

            interventions.append(Intervention(st.kind, st.layer, vectors[st.vector][st.layer], coef=st.coef,
                                              tau=st.tau, positions=st.positions))
        if req.capping and not capping:
            return _error(400, "capping: this server has no capping spec (serve-model --capping FILE)", "capping")
        if req.capping is not False:
            interventions += capping or []  # last: the cap holds whatever the request steers
        with lock:
            model = pool.get(base.resolved(adapters[adapter]) if adapter else base)
            choices, prompt_tokens = sample_chat(
                model, [m.as_dict() for m in req.messages], interventions=interventions,
                max_tokens=req.max_completion_tokens or req.max_tokens, max_request_tokens=limits.max_request_tokens,
                temperature=req.temperature, top_p=req.top_p, n=req.n, seed=req.seed,
                logprobs=req.logprobs, top_logprobs=top_k, stop=stop)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model or served_name,
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
                    "top_logprobs": [token_bytes.entry(t, logp) for t, logp in choice.top[j]] if top_k else []}
                   for j, (tok, lp) in enumerate(zip(choice.token_ids, choice.logprobs))]
    return {"index": index,
            "message": {"role": "assistant", "content": choice.text},
            "finish_reason": choice.finish_reason,
            "logprobs": {"content": content, "refusal": None} if logprobs else None}


def serve(model: str = EMBEDDED, revision: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          dtype: str = "auto", device: str = "auto", vectors: dict[str, str] | None = None,
          adapters: dict[str, str] | None = None, aggregate: str = "response_avg",
          capping: str | None = None, api_key: str | None = None, served_name: str | None = None,
          limits: ServerLimits = ServerLimits()) -> None:
    """Load ``model`` (and the named vector files' ``aggregate`` tensors, and the capping spec
    file ``capping``) and serve it with uvicorn at ``http://host:port/v1`` until interrupted.
    Vector files and the capping spec are checked against the model's config before its weights load."""
    import uvicorn

    from persona_ops.interp.vectors import load_aggregate
    from persona_ops.kernels.cpu_linear import packed_linears
    from persona_ops.models.loading import load_model, model_config, num_layers

    config = model_config(model, revision)
    layers, hidden = num_layers(config), config.get_text_config().hidden_size
    tensors = {}
    for name, path in (vectors or {}).items():
        tensors[name] = load_aggregate(path, aggregate)
        check_vector(tensors[name], layers, hidden, str(path))
    spec = None
    if capping:
        from persona_ops.interp.capping import load_capping

        spec = load_capping(capping)
        spec.check_fits(layers, hidden, capping)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who reaches the port can use the model", host)
    loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    app = create_app(loaded, tensors, adapters, capping=spec.interventions() if spec else None, api_key=api_key,
                     served_name=served_name, limits=limits)
    with packed_linears(loaded.model):  # packed once for the server's lifetime, not per request
        uvicorn.run(app, host=host, port=port, log_level="info")
