"""Continuous batching: the model server's requests decode together, joining and leaving between steps.

One thread owns the model (:class:`Batcher`). A request is a :class:`Job` of rows (its ``n``
completions); jobs wait in a FIFO queue and are admitted between decode steps while the rows fit
in ``max_rows``. Admitted rows are prefilled together (left-padded, in groups of at most
``prefill_tokens`` padded tokens) and join the running batch; each step decodes one token for
every running row; a row leaves at an end-of-sequence token, after its ``max_new`` tokens, or when
cancelled (a stop string, a client gone).

Each row keeps its own sampling parameters, steering edits and monitors:

- Sampling is counter-based: a row's ``t``-th token is drawn at the uniform
  :func:`~persona_ops.inference.sampling.row_uniforms` of (its key, ``t``), its key being a hash
  of the request's seed and the row's index, so a row's draws never depend on the rest of the batch.
- Edits and monitors live in per-row tables that hooks on the decoder blocks read
  (:class:`RowTables`), so one captured decode step (a CUDA graph per batch size and cache length)
  serves any mix of coefficients, vectors and positions; only a larger layout (a new layer, or
  more edits at a layer than the tables hold) captures again.
- Monitors give, per generated token, the projection ``<h, v/|v|>`` (fp32) of the residual
  stream at the position that predicts the token (the last prompt token for the first one, as
  the ``response`` steering positions), read in the forward that samples it, after the edits at
  that layer; layer ``num_layers`` reads after the final norm, as capture does.

Adapters: per row. The LoRA deltas of every served adapter are applied by row, from a mask table
(:class:`~persona_ops.inference.row_lora.RowLora`), so rows of the base model and of any adapters
decode in one forward: one batch, one captured step, the weights read once per step. (Batches by
adapter would step one forward per adapter, each reading all the weights and paying the host's
work per step again.)

Layout: a batch's running rows are packed at the first rows of its cache, left-aligned (column =
position id), so a decode step writes column ``length[r]`` of row ``r`` and attends over
``[0, length[r]]``; a leaving row's place is taken by the last row (its cache rows copied).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from persona_ops.inference.engine import (
    FUSED_DECODE,
    KVStore,
    _DecodeStep,
    _engine_attention,
    _fused_attention,
    prefill_bias,
    prefill_groups,
)
from persona_ops.inference.row_lora import RowLora
from persona_ops.inference.sampling import row_uniforms, sample_rows
from persona_ops.interp.capture import final_norm
from persona_ops.interp.interventions import Intervention
from persona_ops.kernels.cpu_linear import packed_linears
from persona_ops.kernels.fused_projections import fused_projections
from persona_ops.models.loading import LoadedModel

log = logging.getLogger(__name__)
_NO_CAP = float("inf")


@dataclass(frozen=True)
class Monitor:
    """A projection a row reports: ``vector`` at hidden-states ``layer`` (1..num_layers)."""

    name: str
    layer: int
    vector: torch.Tensor  # [H]


@dataclass
class RowSpec:
    """What one row generates: a prompt, sampling, edits (in order) and monitors."""

    prompt: list[int]
    max_new: int
    temperature: float = 1.0
    top_p: float = 1.0
    key: int = 0  # the row's sampling key (see row_key)
    top_logprobs: int | None = None  # None: no logprobs; k: the chosen token's and the k most likely
    edits: Sequence[Intervention] = ()
    monitors: Sequence[Monitor] = ()


def row_key(seed: int, index: int) -> int:
    """A row's sampling key: a 63-bit hash of the request's seed and the row's index in it."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Token:
    """One generated token of a row, with what the row asked for."""

    row: int  # index of the row in its job
    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    monitor: list[float] | None = None  # one value per monitor of the row
    finish: str | None = None  # "stop" (end of sequence), "length", or None while running


@dataclass
class Prefilled:
    """A row's prompt-side monitor values: the mean over the prompt, per monitor."""

    row: int
    prompt_monitor: list[float]


class Job:
    """A request's rows; its events (lists of :class:`Token` / :class:`Prefilled`, or an
    exception) arrive on an asyncio queue of the loop that created it: every step's tokens when
    ``every_token`` (streaming, stop strings), else all at once when the last row ends (the
    event loop then does no work per step, and the model's thread never waits for it)."""

    def __init__(self, rows: Sequence[RowSpec], adapter: str | None, eos: Sequence[int],
                 loop: asyncio.AbstractEventLoop | None = None, every_token: bool = True):
        self.rows, self.adapter, self.eos = list(rows), adapter, set(eos)
        self.every_token = every_token
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled: set[int] = set()  # rows to stop (set from the event loop, read by the batcher)
        self._held: list[Token] = []  # tokens kept back until the last row ends (not every_token)
        self._running = len(self.rows)

    def cancel(self, row: int | None = None) -> None:
        """Stop one row (a stop string) or all (a client gone)."""
        self.cancelled.update(range(len(self.rows)) if row is None else [row])

    def _emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def _deliver(self, tokens: list[Token]) -> None:
        """Hand over a step's tokens (or hold them, see the class docstring)."""
        self._running -= sum(t.finish is not None for t in tokens)
        if self.every_token:
            self._emit(tokens)
            return
        self._held += tokens
        if self._running <= 0:
            self._emit(self._held)


@dataclass
class _Row:
    job: Job
    index: int
    spec: RowSpec
    length: int = 0  # tokens in the cache
    generated: int = 0
    monitor_slots: list[int] = field(default_factory=list)  # output index of each of its monitors


class RowTables:
    """Per-row edits and monitors of one batch as tensors, and the block hooks that apply them.

    Edit slot ``j`` of block ``b`` holds, per row: ``add`` (``coef * v`` or 0), ``unit`` (``v/|v|``
    for ablate and cap), ``ablate`` (coef or 0), ``tau`` (cap's threshold, ``inf`` = none) and
    whether it edits prompt and response positions; one formula covers the three kinds:
    ``h + add - (ablate <h,u> + max(<h,u> - tau, 0)) u``. A row's ``j``-th edit at a layer goes to
    slot ``j`` of its block, so each row's edits apply in its own order.
    """

    def __init__(self, rows: int, hidden: int, device: torch.device, norm: torch.nn.Module | None, num_layers: int):
        self.rows_cap, self.hidden, self.device, self.norm, self.num_layers = rows, hidden, device, norm, num_layers
        self.edits: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.monitors: dict[int, list[torch.Tensor]] = {}  # block -> units [rows, H]
        self.monitor_index: dict[tuple[int, int], int] = {}  # (block, j) -> output row
        self.decode_out = torch.zeros(0, rows, device=device)  # [monitor slots, rows]
        self.prefill_out: dict[int, torch.Tensor] = {}  # output row -> [k, T] projections of a prefill
        self.version = 0  # grows with the layout; captured steps are keyed by it
        self.select: slice | torch.Tensor = slice(0, 0)
        self.prompt: torch.Tensor | None = None  # [k, T] prefill masks; None while decoding
        self.response: torch.Tensor | None = None

    def layout(self) -> tuple:
        return self.version, tuple((b, len(s)) for b, s in sorted(self.edits.items()))

    def _edit_slot(self) -> dict[str, torch.Tensor]:
        r, h, d = self.rows_cap, self.hidden, self.device
        return {"add": torch.zeros(r, h, device=d), "unit": torch.zeros(r, h, device=d),
                "ablate": torch.zeros(r, device=d), "tau": torch.full((r,), _NO_CAP, device=d),
                "in_prompt": torch.zeros(r, device=d), "in_response": torch.zeros(r, device=d)}

    def assign(self, row: int, spec: RowSpec) -> list[int]:
        """Write a row's edits and monitors; return the output index of each monitor."""
        self.clear(row)
        count: dict[int, int] = {}
        for e in spec.edits:
            block = e.layer - 1
            j = count[block] = count.get(block, -1) + 1
            slots = self.edits.setdefault(block, [])
            if j == len(slots):
                slots.append(self._edit_slot())
                self.version += 1
            s = slots[j]
            v = e.vector.detach().to(self.device, torch.float32)
            param = float(e.tau if e.kind == "cap" else e.coef)
            if e.kind == "add":
                s["add"][row] = param * v
            else:
                s["unit"][row] = v / v.norm()
                s["ablate" if e.kind == "ablate" else "tau"][row] = param
            s["in_prompt"][row] = float(e.positions in ("prompt", "all"))
            s["in_response"][row] = float(e.positions in ("response", "all"))
        outputs, mcount = [], {}
        for m in spec.monitors:
            block = m.layer - 1
            j = mcount[block] = mcount.get(block, -1) + 1
            units = self.monitors.setdefault(block, [])
            if j == len(units):
                units.append(torch.zeros(self.rows_cap, self.hidden, device=self.device))
                self.monitor_index[(block, j)] = len(self.monitor_index)
                self.decode_out = torch.zeros(len(self.monitor_index), self.rows_cap, device=self.device)
                self.version += 1
            v = m.vector.detach().to(self.device, torch.float32)
            units[j][row] = v / v.norm()
            outputs.append(self.monitor_index[(block, j)])
        return outputs

    def clear(self, row: int) -> None:
        for slots in self.edits.values():
            for s in slots:
                for name, t in s.items():
                    t[row] = _NO_CAP if name == "tau" else 0.0
        for units in self.monitors.values():
            for u in units:
                u[row] = 0.0

    def move(self, src: int, dst: int) -> None:
        for slots in self.edits.values():
            for s in slots:
                for t in s.values():
                    t[dst] = t[src]
        for units in self.monitors.values():
            for u in units:
                u[dst] = u[src]

    def for_decode(self, rows: int) -> None:
        self.select, self.prompt, self.response = slice(0, rows), None, None

    def for_prefill(self, rows: torch.Tensor, prompt: torch.Tensor, response: torch.Tensor) -> None:
        self.select, self.prompt, self.response = rows, prompt.float(), response.float()
        self.prefill_out = {}

    def _hook(self, block: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            sel = self.select
            if block in self.edits:
                hf = h.float()
                for s in self.edits[block]:
                    unit = s["unit"][sel][:, None]
                    proj = (hf * unit).sum(-1)
                    scale = s["ablate"][sel][:, None] * proj + (proj - s["tau"][sel][:, None]).clamp(min=0)
                    if self.prompt is None:
                        where = s["in_response"][sel][:, None]
                    else:
                        where = (self.prompt * s["in_prompt"][sel][:, None]
                                 + self.response * s["in_response"][sel][:, None])
                    hf = hf + (s["add"][sel][:, None] - scale[..., None] * unit) * where[..., None]
                h = hf.to(h.dtype)
                output = (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
            if block in self.monitors:
                seen = self.norm(h) if block + 1 == self.num_layers and self.norm is not None else h
                hf = seen.float()
                for j, units in enumerate(self.monitors[block]):
                    proj = (hf * units[sel][:, None]).sum(-1)  # [k, T]
                    out = self.monitor_index[(block, j)]
                    if self.prompt is None:
                        self.decode_out[out, sel] = proj[:, -1]
                    else:
                        self.prefill_out[out] = proj
            return output

        return hook

    @contextlib.contextmanager
    def hooks(self, layers: torch.nn.ModuleList):
        handles = [layers[b].register_forward_hook(self._hook(b)) for b in sorted({*self.edits, *self.monitors})]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def _bucket(n: int, cap: int) -> int:
    """The batch size a captured step runs ``n`` rows at: the next power of two, at most ``cap``."""
    return min(cap, 1 << max(0, n - 1).bit_length())


class _Batch:
    """The running rows: their KV cache, state tensors, tables and captured steps."""

    def __init__(self, loaded: LoadedModel, cap: int, graph: bool, prefill_tokens: int, adapters: dict[str, str]):
        self.loaded, self.cap, self.graph, self.prefill_tokens = loaded, cap, graph, prefill_tokens
        model = loaded.model
        self.dev = loaded.device
        self.dtype = next(model.parameters()).dtype
        self.neg = torch.finfo(self.dtype).min
        self.fused = self.dev.type == "cuda" and FUSED_DECODE and _fused_attention() is not None
        self.rows: list[_Row] = []
        long = dict(dtype=torch.long, device=self.dev)
        self.tok, self.length, self.key, self.step = (torch.zeros(cap, **long) for _ in range(4))
        self.start = torch.zeros(cap, **long)  # rows start at column 0 (a captured step reads it: never freed)
        self.temperature = torch.ones(cap, device=self.dev)
        self.top_p = torch.ones(cap, device=self.dev)
        self.tables = RowTables(cap, loaded.hidden_size, self.dev, final_norm(loaded), loaded.num_layers)
        self.lora = RowLora(model, adapters, cap) if adapters else None
        self.allocated, self.columns = 0, 0  # rows and columns of the KV cache (grown as needed)
        self.store: KVStore | None = None
        self.bias: torch.Tensor | None = None
        self.steps: dict[tuple, _DecodeStep] = {}

    # ----------------------------------------------------------------- cache
    def _ensure(self, rows: int, columns: int) -> None:
        """Grow the KV cache to hold ``rows`` rows of ``columns`` columns (powers of two), keeping its contents."""
        rows = max(self.allocated, _bucket(rows, self.cap))
        columns = max(self.columns, 128, 1 << (columns - 1).bit_length())
        if (rows, columns) == (self.allocated, self.columns):
            return
        store = KVStore(rows, columns)
        store.positions = torch.arange(columns, device=self.dev)[None].expand(rows, columns)
        bias = torch.full((rows, 1, 1, columns), self.neg, dtype=self.dtype, device=self.dev)
        if self.store is not None:
            r, c = self.allocated, self.columns
            for old, new in ((self.store.keys, store.keys), (self.store.values, store.values)):
                for layer, t in old.items():
                    new[layer] = t.new_zeros(rows, t.shape[1], columns, t.shape[3])
                    new[layer][:r, :, :c] = t
            bias[:r, ..., :c] = self.bias
        self.store, self.bias, self.allocated, self.columns = store, bias, rows, columns
        self.steps.clear()  # captured against the old buffers

    def _move(self, src: int, dst: int) -> None:
        for t in (self.tok, self.length, self.key, self.step, self.temperature, self.top_p, self.bias):
            t[dst] = t[src]
        for d in (self.store.keys, self.store.values):
            for k in d.values():
                k[dst] = k[src]
        self.tables.move(src, dst)
        if self.lora is not None:
            self.lora.move(src, dst)

    def _free(self, r: int) -> None:
        self.bias[r] = self.neg
        self.length[r] = self.tok[r] = 0
        self.tables.clear(r)
        if self.lora is not None:
            self.lora.clear(r)

    def _applied(self, select: slice | torch.Tensor):
        """The forward's hooks: the rows' edits and monitors, and their adapters."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.tables.hooks(self.loaded.layers))
        if self.lora is not None:
            stack.enter_context(self.lora.applied(select))
        return stack

    # ----------------------------------------------------------------- admission
    def admit(self, new: list[_Row]) -> list[tuple[_Row, int, torch.Tensor, list[float], list[float]]]:
        """Prefill ``new`` rows into the batch; per row: ``(row, batch index, fp32 logits [V],
        monitor means over the prompt, monitor values at the last prompt token)``."""
        self._ensure(len(self.rows) + len(new), max(len(r.spec.prompt) + r.spec.max_new for r in new) + 1)
        start = len(self.rows)
        for i, row in enumerate(new):
            b, s = start + i, row.spec
            row.monitor_slots = self.tables.assign(b, s)
            if self.lora is not None:
                self.lora.assign(b, row.job.adapter)
            elif row.job.adapter is not None:
                raise KeyError(f"adapter {row.job.adapter!r} is not served")
            self.key[b], self.step[b] = s.key, 0
            self.temperature[b], self.top_p[b] = s.temperature, s.top_p
        self.rows.extend(new)
        # rows of one request with the same prompt and edits (its n completions) share one prefill
        leader: dict[tuple, int] = {}
        copies = {i: leader.setdefault((id(r.job), id(r.spec.prompt), id(r.spec.edits), id(r.spec.monitors)), i)
                  for i, r in enumerate(new)}
        firsts = sorted(set(copies.values()), key=lambda i: len(new[i].spec.prompt))
        done = {}
        for g0, g1 in prefill_groups([len(new[i].spec.prompt) for i in firsts], self.prefill_tokens):
            group = firsts[g0:g1]
            done.update(zip(group, self._prefill([start + i for i in group], [new[i] for i in group])))
        out = []
        for i, first in copies.items():
            if i != first:
                self._copy_prefill(start + first, start + i)
                new[i].length = new[first].length
            _, _, logits, means, lasts = done[first]
            out.append((new[i], start + i, logits, means, lasts))
        return out

    def _copy_prefill(self, src: int, dst: int) -> None:
        """Give row ``dst`` the cache of row ``src``'s prefill (the same prompt under the same edits)."""
        for d in (self.store.keys, self.store.values):
            for t in d.values():
                t[dst] = t[src]
        self.bias[dst] = self.bias[src]
        self.length[dst] = self.length[src]

    def _prefill(self, index: list[int], rows: list[_Row]):
        dev, store = self.dev, self.store
        width = max(len(r.spec.prompt) for r in rows)
        k = len(rows)
        ids = torch.zeros(k, width, dtype=torch.long)
        real = torch.zeros(k, width, dtype=torch.bool)
        for i, r in enumerate(rows):
            p = r.spec.prompt
            ids[i, width - len(p):] = torch.tensor(p)
            real[i, width - len(p):] = True
        ids, real = ids.to(dev), real.to(dev)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        mask = prefill_bias(real, self.dtype)
        rows_t = torch.tensor(index, device=dev)
        lengths = torch.tensor([len(r.spec.prompt) for r in rows], device=dev)
        store.prefill, store.rows, store.cols = True, rows_t, slice(0, width)
        store.shift, store.prefill_pos = width - lengths, pos
        last = torch.zeros_like(real)
        last[:, -1] = True
        self.tables.for_prefill(rows_t, real, last)
        self.loaded.activate()  # the base weights: adapters are applied by row
        with _engine_attention(self.loaded.model, store), self._applied(rows_t):
            logits = self.loaded.model(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=False,
                                       logits_to_keep=1).logits[:, -1].float()
        store.shift = store.prefill_pos = None
        cols = torch.arange(self.columns, device=dev)
        self.bias[rows_t] = torch.where(cols < lengths[:, None], 0.0, self.neg).to(self.dtype)[:, None, None]
        self.length[rows_t] = lengths
        out = []
        prompt_means = {o: (p * real).sum(-1) / real.sum(-1) for o, p in self.tables.prefill_out.items()}
        lasts = {o: p[:, -1] for o, p in self.tables.prefill_out.items()}
        for i, (b, r) in enumerate(zip(index, rows)):
            r.length = len(r.spec.prompt)
            means = [float(prompt_means[o][i]) for o in r.monitor_slots]
            out.append((r, b, logits[i], means, [float(lasts[o][i]) for o in r.monitor_slots]))
        return out

    # ----------------------------------------------------------------- decoding
    def decode(self) -> tuple[torch.Tensor, list[list[float]]]:
        """One step for every running row: fp32 logits ``[n, V]`` and each row's monitor values."""
        n = len(self.rows)
        nb = _bucket(n, self.cap) if self.graph else n
        store = self.store
        store.prefill = False
        store.slot, store.step_pos, store.fused = self.length[:nb], self.length[:nb, None], self.fused
        store.kv_len = None if (self.graph or self.fused) else max(r.length for r in self.rows) + 1
        self.tables.for_decode(nb)
        key = (nb, self.columns, self.tables.layout())
        step = self.steps.get(key)
        if step is not None and step.graph is not None:  # a replay: no Python forward
            logits = step()
        else:
            self.loaded.activate()
            store.start = self.start[:nb]
            with _engine_attention(self.loaded.model, store), self._applied(slice(0, nb)):
                step = _DecodeStep(self.loaded.model, self.tok[:nb, None], self.length[:nb, None], self.bias[:nb],
                                   store, graph=self.graph)
                if self.graph:
                    self.steps[key] = step
                logits = step()
        values = self.tables.decode_out[:, :n].T.tolist() if self.tables.monitor_index else [[]] * n
        return logits[:n], [[v[o] for o in r.monitor_slots] for r, v in zip(self.rows, values)]

    def remove(self, finished: list[int]) -> None:
        """Drop rows (batch indices), moving the last rows into their places."""
        for b in sorted(finished, reverse=True):
            last = len(self.rows) - 1
            if b != last:
                self._move(last, b)
                self.rows[b] = self.rows[last]
            self._free(last)
            self.rows.pop()


class Batcher:
    """The model's thread: admits jobs, prefills them, steps the batch, emits tokens.

    ``loaded``: the base model (``activate()`` turns its PEFT adapters off); ``adapters``: served
    name -> PEFT adapter name of the adapters attached to it, applied per row (a job's ``adapter``).
    """

    def __init__(self, loaded: LoadedModel, max_rows: int = 32, prefill_tokens: int | None = None,
                 cuda_graph: bool | None = None, adapters: dict[str, str] | None = None):
        self.model, self.max_rows = loaded.model, max_rows
        dev = loaded.device
        graph = dev.type == "cuda" if cuda_graph is None else (cuda_graph and dev.type == "cuda")
        self.batch = _Batch(loaded, max_rows, graph, prefill_tokens or (8192 if dev.type == "cuda" else 1024),
                            dict(adapters or {}))
        self.waiting: deque[Job] = deque()
        self.calls: deque[tuple[Callable, asyncio.Future, asyncio.AbstractEventLoop]] = deque()
        self.stats = {"peak_rows": 0, "steps": 0, "admitted": 0, "rows": 0}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="persona-ops-batcher", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- the event-loop side
    def submit(self, job: Job) -> Job:
        if len(job.rows) > self.max_rows:
            raise ValueError(f"{len(job.rows)} rows exceed the batch of {self.max_rows}")
        with self._cond:
            self.waiting.append(job)
            self._cond.notify()
        return job

    async def call(self, fn: Callable):
        """Run ``fn()`` on the model's thread between steps; return its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            self.calls.append((fn, future, loop))
            self._cond.notify()
        return await future

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # ----------------------------------------------------------------- the model's thread
    def running(self) -> int:
        return len(self.batch.rows)

    def _loop(self) -> None:
        # packed (CPU) and fused (GPU) once, for the thread's life
        with torch.inference_mode(), packed_linears(self.model), fused_projections(self.model):
            self._serve()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._stop or self.waiting or self.calls or self.running()):
                    self._cond.wait()
                if self._stop:
                    return
                calls = list(self.calls)
                self.calls.clear()
                admitted = []
                rows = self.running()
                while self.waiting and rows + len(self.waiting[0].rows) <= self.max_rows:
                    job = self.waiting.popleft()
                    if len(job.cancelled) < len(job.rows):  # a client gone while it waited is skipped
                        admitted.append(job)
                        rows += len(job.rows)
            for fn, future, loop in calls:
                self._run_call(fn, future, loop)
            if admitted:  # one prefill for the new rows, whatever their adapters
                self._guard(admitted, lambda: self._admit(admitted))
            self.stats["peak_rows"] = max(self.stats["peak_rows"], self.running())
            if self.batch.rows:
                self._guard({r.job for r in self.batch.rows}, self._step)

    @staticmethod
    def _run_call(fn, future, loop) -> None:
        try:
            with torch.inference_mode(False):  # e.g. attaching an adapter: ordinary tensors, usable elsewhere
                result = fn()
        except Exception as e:  # delivered to the request
            loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    def _guard(self, jobs, fn) -> None:
        """Run ``fn``; on an error, fail ``jobs`` with it and drop their rows."""
        try:
            fn()
        except Exception as e:
            log.exception("generation failed")
            for job in jobs:
                job._emit(e)
            b = self.batch
            b.remove([i for i, r in enumerate(b.rows) if r.job in jobs])

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the rows of ``jobs`` into the batch and emit their first tokens."""
        batch = self.batch
        first = batch.admit([_Row(job, i, spec) for job in jobs for i, spec in enumerate(job.rows)])
        self.stats["admitted"] += len(jobs)
        self.stats["rows"] += len(first)
        for job in jobs:
            job._emit([Prefilled(r.index, means) for r, _, _, means, _ in first if r.job is job])
        self._emit_tokens(batch, [f[0] for f in first], [f[1] for f in first], torch.stack([f[2] for f in first]),
                          [f[4] for f in first], decoded=False)

    def _step(self) -> None:
        batch = self.batch
        logits, monitor = batch.decode()
        self.stats["steps"] += 1
        self._emit_tokens(batch, list(batch.rows), list(range(len(batch.rows))), logits, monitor, decoded=True)

    def _emit_tokens(self, batch: _Batch, rows: list[_Row], index: list[int], logits: torch.Tensor,
                     monitor: list[list[float]], decoded: bool) -> None:
        """Sample the next token of ``rows`` (at batch ``index``) from ``logits``, emit it, retire
        finished rows; ``decoded``: after a decode step (every row's token entered the cache)."""
        idx = slice(0, len(index)) if decoded else torch.tensor(index, device=batch.dev)
        nxt = sample_rows(logits, batch.temperature[idx], batch.top_p[idx],
                          row_uniforms(batch.key[idx], batch.step[idx]),
                          any_top_p=any(r.spec.top_p < 1 and r.spec.temperature > 0 for r in rows))
        top_k = max((r.spec.top_logprobs for r in rows if r.spec.top_logprobs is not None), default=None)
        chosen = tops = None
        if top_k is not None:
            logp = torch.log_softmax(logits.float(), -1)
            chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist()
            if top_k:
                values, ids = logp.topk(top_k, -1)
                tops = list(zip(ids.tolist(), values.tolist()))
        tokens = nxt.tolist()
        batch.tok[idx] = nxt
        batch.step[idx] += 1
        by_job: dict[Job, list[Token]] = {}
        finished = []
        for i, (row, b) in enumerate(zip(rows, index)):
            spec, t = row.spec, tokens[i]
            row.generated += 1
            finish = "stop" if t in row.job.eos else ("length" if row.generated >= spec.max_new else None)
            if finish is None and row.index in row.job.cancelled:
                finish = "cancelled"
            event = Token(row.index, t, finish=finish)
            if spec.top_logprobs is not None:
                event.logprob = chosen[i]
                if spec.top_logprobs:
                    event.top = list(zip(tops[i][0][:spec.top_logprobs], tops[i][1][:spec.top_logprobs]))
            if row.monitor_slots:
                event.monitor = monitor[i]
            by_job.setdefault(row.job, []).append(event)
            if finish is not None:
                finished.append(b)
        if decoded:
            batch.length[:len(rows)] += 1
            for r in rows:
                r.length += 1
        for job, events in by_job.items():
            job._deliver(events)
        batch.remove(finished)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
