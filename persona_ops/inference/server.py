"""An OpenAI-compatible model server over a local model, with continuous batching.

``persona-ops serve-model`` runs it, so anything that speaks the OpenAI API (the ``openai``
client, Inspect AI, lm-evaluation-harness, ``OpenAIJudge``) can use the embedded model or any HF
model. Endpoints: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions`` (a prompt as
text or token ids; ``echo``; ``max_tokens=0`` with ``echo`` scores the prompt only). Both take
``temperature`` (0 = greedy), ``top_p``, ``max_tokens``, ``n``, ``seed``, ``stop`` (at most 16),
logprobs (chat: ``logprobs``/``top_logprobs``; completions: ``logprobs=k``) and ``stream``
(server-sent events; ``stream_options.include_usage``). No tools or penalties.

Requests decode together (:mod:`persona_ops.inference.batcher`): each joins the running batch
between steps and leaves when done; ``n`` completions are rows of the same batch. A seeded
request draws the same random numbers whatever else is in the batch (its completions are equal
up to the floating-point differences a batch size makes in the matmuls). Logprobs are the fp32
log-softmax of the model's raw logits at each position, i.e. **before** temperature and top-p,
taken from the very forward that sampled the token; a completions request's echoed prompt is
scored by one teacher-forced forward with the request's steering.

Persona-ops extensions (the openai client's ``extra_body``):

- ``steering``: a list of ``{vector, layer, kind: add|ablate|cap, coef, tau, positions}``;
  ``vector`` names a vector the server was started with (``--vector NAME=FILE``), ``layer``
  is a hidden_states index (the output of block ``layer-1`` is edited).
- ``adapter``: the name of a LoRA adapter the server was started with (``--adapter NAME=DIR``).
- ``capping``: ``false`` turns off the server's activation capping (``--capping FILE``, on for
  every request by default; applied after the request's ``steering``).
- ``monitor``: a list of ``{vector, layer}`` or ``{axis, layer?}`` (a persona space served with
  ``--axis NAME=FILE``; default layer: the space's), each optionally with a ``threshold``. Each
  choice then carries ``monitor``: per entry, ``tokens`` (the projection ``<h, v/|v|>`` of the
  residual stream at the position that predicts each returned token, computed in the forward
  that sampled it), their ``mean`` (the turn), ``prompt_mean`` (over the prompt's tokens) and
  ``crossed_at`` (the first token above ``threshold``, or null). Streamed chunks carry each
  token's values.

``model`` names the served model (its id in ``/v1/models``) or one of its adapters (listed there
with the model as ``parent``; the same as sending ``adapter``); another name gets 404
``model_not_found``. With an API key (``--api-key`` or ``PERSONA_OPS_SERVER_API_KEY``) every path
wants ``Authorization: Bearer KEY`` (401 otherwise). Limits (:class:`ServerLimits`): prompt plus
``max_tokens`` within the model's context; ``n`` x (prompt + ``max_tokens``), summed over the prompts, within
``max_request_tokens``; a request's rows within ``max_batch``; 400 beyond any. At most
``max_batch + max_queue`` requests are inside; one more gets 429 with ``Retry-After``
(:mod:`persona_ops.inference.admission`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from persona_ops.chat import encode, prompt_ids
from persona_ops.errors import InputError
from persona_ops.inference.admission import Admission, AdmissionMiddleware
from persona_ops.inference.api import (
    MIN_LOGPROB,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationRequest,
    TokenBytes,
)
from persona_ops.inference.batcher import Batcher, Job, Monitor, Prefilled, RowSpec, Token, row_key
from persona_ops.inference.engine import stop_ids
from persona_ops.models.loading import EMBEDDED, LoadedModel

log = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 512
API_KEY_ENV = "PERSONA_OPS_SERVER_API_KEY"
SEED_MIN, SEED_MAX = -2 ** 63, 2 ** 63 - 1  # int64, as OpenAI's API


@dataclass(frozen=True)
class ServerLimits:
    """What one request, and all of them together, may hold."""

    max_batch: int = 32  # rows (completions) decoding together
    max_queue: int = 16  # requests waiting beyond those the batch can hold; more get 429
    max_request_tokens: int = 32768  # n x (prompt + max_tokens): the KV cache rows one request reserves
    max_body_bytes: int = 8 << 20
    retry_after_s: int = 1


class BadRequest(Exception):
    """A request the server refuses (4xx), in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


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


# ----------------------------------------------------------------------------- one choice

class _Choice:
    """A completion as it is generated: tokens, their logprobs and monitor values, and its text
    (cut before a stop string; text that may still become one is held back from streaming)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]] | None] = []
        self.monitor: list[list[float]] = []  # per token, one value per monitor
        self.prompt_monitor: list[float] = []
        self.text, self.sent = "", 0
        self.generated = 0  # tokens generated, a stopping end-of-sequence token included
        self.finish: str | None = None
        self._decoded, self._context, self._read = "", 0, 0  # incremental decoding (see _text)

    def add(self, event: Token) -> str:
        """Take the next token; return the text that may be sent now."""
        if self.finish is not None:  # generated after a stop string completed
            return ""
        self.generated += 1
        if event.finish != "stop":  # an end-of-sequence token is counted, not returned
            self.ids.append(event.token)
            self.logprobs.append(event.logprob)
            self.top.append(event.top)
            self.monitor.append(event.monitor or [])
        self.finish = event.finish
        text = self._text()
        hits = [text.index(s) for s in self.stop if s in text]
        if hits:
            self._cut(text[:min(hits)])
        else:
            self.text = text
        safe = len(self.text) if self.finish else len(self.text) - self._held(self.text)
        delta = self.text[self.sent:max(self.sent, safe)]
        self.sent = max(self.sent, safe)
        return delta

    def _text(self) -> str:
        """The text of ``ids``, decoded a few tokens at a time: the tokens after ``_read`` are decoded
        with those from ``_context`` before them (so a word's leading space is kept) and their new
        characters appended once they form whole characters; the final text is one full decode."""
        decode = self.tokenizer.decode
        if self.finish is not None:
            return decode(self.ids, skip_special_tokens=True)
        before = decode(self.ids[self._context:self._read], skip_special_tokens=True)
        after = decode(self.ids[self._context:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._decoded += after[len(before):]
            self._context, self._read = self._read, len(self.ids)
        return self._decoded

    def _cut(self, text: str) -> None:
        """End at a stop string: keep ``text`` and the tokens that start before its end."""
        keep = 0
        decode = self.tokenizer.decode
        while keep < len(self.ids) and len(decode(self.ids[:keep], skip_special_tokens=True)) < len(text):
            keep += 1
        for name in ("ids", "logprobs", "top", "monitor"):
            setattr(self, name, getattr(self, name)[:keep])
        self.text, self.finish = text, "stop"

    def _held(self, text: str) -> int:
        """Characters at the end that may be the start of a stop string or of a multi-byte character."""
        held = len(text) - len(text.rstrip("\ufffd"))
        for s in self.stop:
            held = max(held, next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0))
        return held


@dataclass
class _Plan:
    """A validated request: the prompts, the rows to generate and what the answer reports."""

    prompts: list[list[int]]
    rows: list[RowSpec]
    adapter: str | None
    stop: list[str]
    monitors: list[dict] = field(default_factory=list)  # the request's monitor entries, as answered
    thresholds: list[float | None] = field(default_factory=list)
    interventions: list = field(default_factory=list)


# ----------------------------------------------------------------------------- the app

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
               capping: list | None = None, *, axes: dict | None = None, api_key: str | None = None,
               served_name: str | None = None, limits: ServerLimits = ServerLimits()) -> FastAPI:
    """A FastAPI app serving ``loaded`` under ``/v1`` (models, chat completions, completions).

    ``vectors``: name -> ``[num_layers + 1, hidden]`` tensor usable in ``steering`` and ``monitor``;
    ``adapters``: name -> LoRA checkpoint directory usable as ``adapter`` or ``model``;
    ``capping``: interventions applied to every request unless it sends ``capping: false``
    (``persona_ops.interp.capping.CappingSpec.interventions()``); ``axes``: name -> persona space
    (``persona_ops.interp.space.PersonaSpace``) whose Assistant Axis ``monitor`` can name;
    ``api_key``: the bearer token every request must send (None: none); ``served_name``: the model's
    id in ``/v1/models`` (default: its label). ``app.state.admission`` counts the requests inside,
    ``app.state.batcher.stats`` the batching (``peak_rows``: the most rows decoded together).
    """
    vectors, adapters, axes = dict(vectors or {}), dict(adapters or {}), dict(axes or {})
    for name, tensor in vectors.items():
        check_vector(tensor, loaded.num_layers, loaded.hidden_size, f"vector {name!r}")
    for name, space in axes.items():
        if space.axis.shape[-1] != loaded.hidden_size or max(space.layers) > loaded.num_layers:
            raise InputError(f"axis {name!r}: layers {space.layers} and hidden size {space.axis.shape[-1]} do not "
                             f"fit the model ({loaded.num_layers} layers, hidden size {loaded.hidden_size})")
    served_name = served_name or loaded.label
    if served_name in adapters:
        raise InputError(f"adapter {served_name!r}: the served model has that name already")
    pool, base = _pool_of(loaded)  # every adapter attached at the start; generation applies them per row
    models: dict[str | None, LoadedModel] = {None: pool.get(base)}
    refs = {name: base.resolved(directory) for name, directory in adapters.items()}
    models.update({name: pool.get(ref) for name, ref in refs.items()})
    batcher = Batcher(models[None], max_rows=limits.max_batch,
                      adapters={name: pool.adapter_name(ref) for name, ref in refs.items()})
    token_bytes = TokenBytes(loaded.tokenizer)
    eos = stop_ids(loaded)
    context = getattr(loaded.model.config, "max_position_embeddings", None) or 10 ** 9
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="persona-ops model server", lifespan=lifespan)
    app.state.batcher = batcher
    app.state.admission = Admission(capacity=limits.max_batch + limits.max_queue)
    app.add_middleware(AdmissionMiddleware, admission=app.state.admission,
                       paths={"/v1/chat/completions", "/v1/completions"}, max_body_bytes=limits.max_body_bytes,
                       retry_after_s=limits.retry_after_s, refuse=_refusal)

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

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest):
        return _error(exc.status, str(exc), exc.param, code=exc.code,
                      kind="not_found_error" if exc.status == 404 else "invalid_request_error")

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

    # --------------------------------------------------------------- validation
    def plan(req: GenerationRequest, prompts: list[list[int]], max_tokens: int | None, top_k: int | None) -> _Plan:
        if req.model is not None and req.model != served_name and req.model not in adapters:
            raise BadRequest(f"model {req.model!r} is not served here; served: {[served_name, *adapters]}",
                             "model", 404, "model_not_found")
        adapter = req.model if req.model in adapters else req.adapter
        if req.adapter is not None and req.adapter != adapter:
            raise BadRequest(f"adapter {req.adapter!r}: the request's model is the adapter {adapter!r}", "adapter")
        if adapter is not None and adapter not in adapters:
            raise BadRequest(f"adapter {adapter!r} unknown; served: {sorted(adapters)}", "adapter")
        if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
            raise BadRequest(f"seed: expected an integer in -2**63..2**63-1, found {req.seed}", "seed")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise BadRequest("stop: at most 16 sequences", "stop")
        if len(prompts) * req.n > limits.max_batch:
            raise BadRequest(f"{len(prompts)} prompt(s) x n={req.n} = {len(prompts) * req.n} completions; this "
                             f"server decodes at most {limits.max_batch} together (serve-model --max-batch)", "n")
        vocab = loaded.model.config.get_text_config().vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise BadRequest(f"prompt: token ids must lie in 0..{vocab - 1}", "prompt")
        interventions = steering(req)
        monitors, answered, thresholds = monitor_specs(req)
        seed = req.seed if req.seed is not None else random.getrandbits(63)
        rows, reserved = [], 0
        for p, prompt in enumerate(prompts):
            budget = token_budget(len(prompt), max_tokens, req.n, context, limits.max_request_tokens)
            reserved += req.n * (len(prompt) + budget)
            if reserved > limits.max_request_tokens:
                raise BadRequest(f"the prompts' KV cache, n x (prompt + max_tokens) summed over {len(prompts)} "
                                 f"prompts, is {reserved}+ tokens; this server's limit is "
                                 f"{limits.max_request_tokens}: send fewer prompts per request", "prompt")
            if budget:
                rows += [RowSpec(prompt, budget, req.temperature, req.top_p, row_key(seed, p * req.n + j), top_k,
                                 interventions, monitors) for j in range(req.n)]
        return _Plan(prompts, rows, adapter, [s for s in stop if s], answered, thresholds, interventions)

    def steering(req: GenerationRequest) -> list:
        from persona_ops.interp.interventions import Intervention

        out = []
        for i, st in enumerate(req.steering):
            if st.vector not in vectors:
                raise BadRequest(f"steering[{i}].vector {st.vector!r} unknown; served: {sorted(vectors)}",
                                 f"steering.{i}.vector")
            check_layer(st.layer, f"steering[{i}].layer")
            out.append(Intervention(st.kind, st.layer, vectors[st.vector][st.layer], coef=st.coef, tau=st.tau,
                                    positions=st.positions))
        if req.capping and not capping:
            raise BadRequest("capping: this server has no capping spec (serve-model --capping FILE)", "capping")
        if req.capping is not False:
            out += capping or []  # last: the cap holds whatever the request steers
        return out

    def monitor_specs(req: GenerationRequest) -> tuple[list[Monitor], list[dict], list[float | None]]:
        monitors, answered = [], []
        for i, m in enumerate(req.monitor):
            if m.vector is not None:
                if m.vector not in vectors:
                    raise BadRequest(f"monitor[{i}].vector {m.vector!r} unknown; served: {sorted(vectors)}",
                                     f"monitor.{i}.vector")
                check_layer(m.layer, f"monitor[{i}].layer")
                vector, entry = vectors[m.vector][m.layer], {"vector": m.vector, "layer": m.layer}
            else:
                if m.axis not in axes:
                    raise BadRequest(f"monitor[{i}].axis {m.axis!r} unknown; served: {sorted(axes)}",
                                     f"monitor.{i}.axis")
                space = axes[m.axis]
                layer = space.layer if m.layer is None else m.layer
                if layer not in space.layers:
                    raise BadRequest(f"monitor[{i}].layer {layer}: the axis {m.axis!r} has layers {space.layers}",
                                     f"monitor.{i}.layer")
                vector, entry = space.axis[space.row(layer)], {"axis": m.axis, "layer": layer}
            if not float(vector.norm()) > 0:
                raise BadRequest(f"monitor[{i}]: the vector is zero at layer {entry['layer']}", f"monitor.{i}")
            monitors.append(Monitor(entry.get("vector") or entry["axis"], entry["layer"], vector))
            answered.append(entry)
        return monitors, answered, [m.threshold for m in req.monitor]

    def check_layer(layer: int, what: str) -> None:
        if not 1 <= layer <= loaded.num_layers:
            param = what.replace("[", ".").replace("]", "")
            raise BadRequest(f"{what} {layer}: expected 1..{loaded.num_layers}", param)

    # --------------------------------------------------------------- generation
    async def run(p: _Plan, choices: list[_Choice], request: Request,
                  stream: bool) -> AsyncIterator[tuple[int, str, int]]:
        """Generate ``p``'s rows; yield ``(row, new text, tokens before)`` as tokens arrive (every step's
        when streaming or watching for stop strings, else all at the end)."""
        if not p.rows:
            return
        job = batcher.submit(Job(p.rows, p.adapter, eos, every_token=stream or bool(p.stop)))
        try:
            while any(c.finish is None for c in choices):
                try:
                    events = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if isinstance(events, Exception):
                    raise events
                for event in events:
                    choice = choices[event.row]
                    if isinstance(event, Prefilled):
                        choice.prompt_monitor = event.prompt_monitor
                        continue
                    before = len(choice.ids)
                    text = choice.add(event)
                    if choice.finish is not None and event.finish is None:  # a stop string
                        job.cancel(event.row)
                    yield event.row, text, before
        finally:
            job.cancel()  # rows still running (a client gone, an error) leave the batch

    async def echo_scores(p: _Plan, model: LoadedModel, top_k: int) -> list[tuple[list, list]]:
        return await batcher.call(lambda: [_score_prompt(model, ids, top_k, p.interventions) for ids in p.prompts])

    def usage(p: _Plan, choices: list[_Choice]) -> dict:
        prompt_tokens = sum(len(x) for x in p.prompts)
        completion = sum(c.generated for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def monitor_json(p: _Plan, c: _Choice) -> list[dict]:
        out = []
        for k, entry in enumerate(p.monitors):
            values = [m[k] for m in c.monitor]
            threshold = p.thresholds[k]
            crossed = next((j for j, v in enumerate(values) if threshold is not None and v > threshold), None)
            out.append({**entry, "tokens": values, "mean": sum(values) / len(values) if values else None,
                        "prompt_mean": c.prompt_monitor[k] if c.prompt_monitor else None,
                        "threshold": threshold, "crossed_at": crossed})
        return out

    def header(kind: str, req: GenerationRequest) -> dict:
        return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": req.model or served_name}

    def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk)}\n\n"
            except (BadRequest, InputError) as e:
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'invalid_request_error'}})}\n\n"
            except Exception as e:  # the status line is sent already: report in the stream
                log.exception("streamed generation failed")
                yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --------------------------------------------------------------- chat completions
    def chat_logprobs(c: _Choice, start: int, top_k: int | None, as_id: bool) -> dict | None:
        if top_k is None:
            return None
        return {"content": [{**token_bytes.entry(t, lp, as_id),
                             "top_logprobs": [token_bytes.entry(a, la, as_id) for a, la in (top or [])][:top_k]}
                            for t, lp, top in zip(c.ids[start:], c.logprobs[start:], c.top[start:])],
                "refusal": None}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if req.top_logprobs and not req.logprobs:
            raise BadRequest("top_logprobs requires logprobs=true", "top_logprobs")
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        prompt = prompt_ids(loaded.tokenizer, [m.as_dict() for m in req.messages])
        p = plan(req, [prompt], req.max_completion_tokens or req.max_tokens, top_k)
        choices = [_Choice(loaded.tokenizer, p.stop) for _ in range(req.n)]
        head = {**header("chatcmpl", req), "system_fingerprint": None}

        def choice_json(i: int, c: _Choice) -> dict:
            out = {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish,
                   "logprobs": chat_logprobs(c, 0, top_k, req.return_tokens_as_token_ids)}
            return {**out, "monitor": monitor_json(p, c)} if p.monitors else out

        if not req.stream:
            async for _ in run(p, choices, request, stream=False):
                pass
            return {**head, "object": "chat.completion", "choices": [choice_json(i, c) for i, c in enumerate(choices)],
                    "usage": usage(p, choices)}

        async def chunks():
            chunk = {**head, "object": "chat.completion.chunk"}
            for i in range(req.n):
                yield {**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}]}
            async for row, text, before in run(p, choices, request, stream=True):
                c = choices[row]
                entry = {"index": row, "delta": {"content": text} if text else {},
                         "logprobs": chat_logprobs(c, before, top_k, req.return_tokens_as_token_ids),
                         "finish_reason": c.finish}
                if p.monitors:
                    entry["monitor"] = c.monitor[before:]
                if text or c.finish or p.monitors or top_k is not None:
                    yield {**chunk, "choices": [entry]}
            if req.stream_options and req.stream_options.include_usage:
                yield {**chunk, "choices": [], "usage": usage(p, choices)}

        return sse(chunks())

    # --------------------------------------------------------------- completions
    def texts_of(prompt) -> tuple[list[list[int]], list[str]]:
        tok = loaded.tokenizer
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        ids = [encode(tok, x) if isinstance(x, str) else list(x) for x in prompt]
        if any(not x for x in ids):
            raise BadRequest("prompt: an empty prompt (no tokens)", "prompt")
        return ids, [x if isinstance(x, str) else tok.decode(x) for x in prompt]

    def legacy_logprobs(ids: list[int], lps: list, tops: list, offset: int, top_k: int, as_id: bool) -> dict:
        def name(t: int) -> str:
            return token_bytes.entry(t, 0.0, as_id)["token"]

        tokens = [name(t) for t in ids]
        offsets = []
        for t in tokens:
            offsets.append(offset)
            offset += len(t)
        return {"tokens": tokens, "token_logprobs": [None if lp is None else max(lp, MIN_LOGPROB) for lp in lps],
                "top_logprobs": [None if top is None else
                                 {name(a): max(la, MIN_LOGPROB) for a, la in top[:top_k]}
                                 for top in tops],
                "text_offset": offsets}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        ids, texts = texts_of(req.prompt)
        if req.max_tokens == 0 and not req.echo:
            raise BadRequest("max_tokens=0 generates nothing: send echo=true to score the prompt", "max_tokens")
        top_k = req.logprobs
        p = plan(req, ids, req.max_tokens, top_k)
        choices = [_Choice(loaded.tokenizer, p.stop) for _ in range(len(ids) * req.n)]
        if req.max_tokens == 0:
            for c in choices:
                c.finish = "length"
        scores = (await echo_scores(p, models[p.adapter], top_k or 0)
                  if req.echo and top_k is not None else None)
        head = {**header("cmpl", req), "object": "text_completion"}

        def logprobs_of(i: int, c: _Choice, start: int = 0, with_echo: bool = True) -> dict | None:
            """Legacy logprobs of ``c``'s tokens from ``start`` (after the echoed prompt's when
            ``with_echo``); ``text_offset`` counts characters from the start of the prompt."""
            if top_k is None:
                return None
            prompt = i // req.n
            as_id = req.return_tokens_as_token_ids
            offset = len(texts[prompt]) + sum(len(token_bytes.entry(t, 0.0)["token"]) for t in c.ids[:start])
            gen = legacy_logprobs(c.ids[start:], c.logprobs[start:], c.top[start:], offset, top_k, as_id)
            if not (req.echo and with_echo):
                return gen
            echo = legacy_logprobs(ids[prompt], *scores[prompt], 0, top_k, as_id)
            return {k: echo[k] + gen[k] for k in echo}

        def choice_json(i: int, c: _Choice) -> dict:
            text = (texts[i // req.n] if req.echo else "") + c.text
            out = {"index": i, "text": text, "finish_reason": c.finish, "logprobs": logprobs_of(i, c)}
            return {**out, "monitor": monitor_json(p, c)} if p.monitors else out

        if not req.stream:
            async for _ in run(p, choices, request, stream=False):
                pass
            return {**head, "choices": [choice_json(i, c) for i, c in enumerate(choices)], "usage": usage(p, choices)}

        async def chunks():
            if req.echo or req.max_tokens == 0:
                for i, c in enumerate(choices):
                    lp = logprobs_of(i, _Choice(loaded.tokenizer, []))
                    yield {**head, "choices": [{"index": i, "text": texts[i // req.n] if req.echo else "",
                                                "logprobs": lp, "finish_reason": c.finish}]}
            async for row, text, before in run(p, choices, request, stream=True):
                c = choices[row]
                entry = {"index": row, "text": text, "logprobs": logprobs_of(row, c, before, with_echo=False),
                         "finish_reason": c.finish}
                if p.monitors:
                    entry["monitor"] = c.monitor[before:]
                yield {**head, "choices": [entry]}
            if req.stream_options and req.stream_options.include_usage:
                yield {**head, "choices": [], "usage": usage(p, choices)}

        return sse(chunks())

    return app


@torch.inference_mode()
def _score_prompt(loaded: LoadedModel, ids: list[int], top_k: int, interventions=()) -> tuple[list, list]:
    """Logprobs of each prompt token given the ones before it (None for the first), and the
    ``top_k`` most likely tokens at each position: one teacher-forced forward, steered as
    generation is (every token a prompt position, the last one also a response position)."""
    from persona_ops.interp.interventions import Steerer, teacher_forced_masks

    loaded.activate()
    steerer = Steerer(loaded.layers, interventions) if interventions else None
    x = torch.tensor([ids], device=loaded.device)
    with steerer if steerer is not None else contextlib.nullcontext():
        if steerer is not None:
            steerer.set_positions(*teacher_forced_masks(torch.ones_like(x), [len(ids)]))
        logits = loaded.model(input_ids=x, use_cache=False).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), -1)
    chosen = logp.gather(-1, x[0, 1:, None])[:, 0].tolist()
    tops: list = [None] * len(chosen)
    if top_k:
        values, indices = logp.topk(top_k, -1)
        tops = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    return [None, *chosen], [None, *tops]


def _pool_of(loaded: LoadedModel):
    """A model pool holding the served base model, and the reference naming it."""
    from persona_ops.models.pool import ModelPool
    from persona_ops.models.refs import ModelRef

    base = ModelRef(name=loaded.label)
    pool = ModelPool()
    pool.add(base, loaded)
    return pool, base


def serve(model: str = EMBEDDED, revision: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          dtype: str = "auto", device: str = "auto", vectors: dict[str, str] | None = None,
          adapters: dict[str, str] | None = None, aggregate: str = "response_avg",
          capping: str | None = None, axes: dict[str, str] | None = None, api_key: str | None = None,
          served_name: str | None = None, limits: ServerLimits = ServerLimits()) -> None:
    """Load ``model`` (and the named vector files' ``aggregate`` tensors, the capping spec file
    ``capping`` and the persona-space files ``axes``) and serve it with uvicorn at
    ``http://host:port/v1`` until interrupted. Every file is checked against the model's config
    before its weights load."""
    import uvicorn

    from persona_ops.interp.space import load_persona_space
    from persona_ops.interp.vectors import load_aggregate
    from persona_ops.models.loading import load_model, model_config, num_layers

    config = model_config(model, revision)
    layers, hidden = num_layers(config), config.get_text_config().hidden_size
    tensors = {}
    for name, path in (vectors or {}).items():
        tensors[name] = load_aggregate(path, aggregate)
        check_vector(tensors[name], layers, hidden, str(path))
    spaces = {}
    for name, path in (axes or {}).items():
        spaces[name] = load_persona_space(path)
        if spaces[name].axis.shape[-1] != hidden or max(spaces[name].layers) > layers:
            raise InputError(f"{path}: the persona space (layers {spaces[name].layers}, hidden size "
                             f"{spaces[name].axis.shape[-1]}) does not fit the model ({layers} layers, "
                             f"hidden {hidden})")
    spec = None
    if capping:
        from persona_ops.interp.capping import load_capping

        spec = load_capping(capping)
        spec.check_fits(layers, hidden, capping)
    if api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone who reaches the port can use the model", host)
    loaded = load_model(model, revision=revision, dtype=dtype, device=device)
    app = create_app(loaded, tensors, adapters, capping=spec.interventions() if spec else None, axes=spaces,
                     api_key=api_key, served_name=served_name, limits=limits)
    uvicorn.run(app, host=host, port=port, log_level="info")
