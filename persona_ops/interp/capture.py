"""Activation capture engine: batched, layer-selective, aggregated on the device.

Layer convention: layer ``L`` is ``hidden_states[L]`` - 0 is the embedding output (the input
of block 0), ``1 <= L < num_layers`` the output of block ``L-1`` and ``L = num_layers`` the last
block's output after the final norm (as HF's ``hidden_states[-1]``).
Positions: ``prompt`` = tokens of the rendered chat up to and including the generation
prompt; ``response`` = the assistant's tokens. Padding never counts.

How it is fast: samples are sorted by length and packed into right-padded batches under a
token budget (padded tokens); with right padding a causal model needs no attention mask
(real tokens never see the padding after them), so SDPA runs its fused causal kernel.
Forward hooks on the requested layers reduce each batch to the aggregates in fp32 on the
device, and the forward stops (by an exception) after the last requested layer. Device memory
is bounded by the token budget; the aggregate ``none`` streams per-token rows to safetensors
shards on disk, so host memory is bounded too.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from persona_ops.chat import encode
from persona_ops.errors import InputError
from persona_ops.kernels.compile import compiled_blocks
from persona_ops.kernels.cpu_linear import packed_linears
from persona_ops.models.loading import LoadedModel

AGGREGATES = ("prompt_avg", "response_avg", "prompt_last")
ALL_AGGREGATES = AGGREGATES + ("none",)
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_norm")
_PENDING_BYTES = 256 * 2**20  # device-held aggregates before a copy to the host
CPU_TOKEN_BUDGET = 1024  # padded tokens per batch on the CPU, whatever larger budget is asked
MAX_CPU_WORKERS = 4
PACK_LINEARS = True  # CPU linears on oneDNN packed weights (False: MKL's F.linear)


class _StopForward(Exception):
    """Raised by the hook on the last requested layer to end the forward early."""


def plan_batches(lengths: Sequence[int], token_budget: int, max_batch: int = 1024) -> list[list[int]]:
    """Length-sorted batches whose padded size (rows x longest row) stays within ``token_budget``.

    Longest samples first, so the largest activations are allocated at the start. A sample
    longer than the budget gets a batch of its own. Every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and ((len(cur) + 1) * width > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def final_norm(loaded: LoadedModel) -> torch.nn.Module | None:
    """The backbone's final norm (applied to ``hidden_states[num_layers]``), if it has one."""
    for name in _NORM_NAMES:
        mod = getattr(loaded.backbone, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


@dataclass
class CaptureResult:
    """Aggregates ``[n, len(layers), hidden]`` fp32 (CPU) per name; shards for ``none``."""

    layers: list[int]
    means: dict[str, torch.Tensor] = field(default_factory=dict)
    shards: list[Path] = field(default_factory=list)
    num_tokens: int = 0  # real (unpadded) tokens processed


class _ShardWriter:
    """Buffers per-token rows and writes safetensors shards of about ``shard_tokens`` rows.

    Each shard holds ``layer_{L}`` ``[rows, hidden]`` (model dtype), ``sample`` (index of the
    input sample), ``position`` (token index in the sample) and ``is_response`` (uint8).
    """

    def __init__(self, out_dir: Path, layers: list[int], shard_tokens: int):
        self.dir, self.layers, self.limit = Path(out_dir), layers, shard_tokens
        self.dir.mkdir(parents=True, exist_ok=True)
        self.buf: dict[str, list[torch.Tensor]] = {}
        self.rows = 0
        self.paths: list[Path] = []

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.buf.setdefault(k, []).append(v.cpu())
        self.rows += len(tensors["sample"])
        if self.rows >= self.limit:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        path = self.dir / f"shard-{len(self.paths):05d}.safetensors"
        tmp = path.with_suffix(".partial")
        save_file({k: torch.cat(v).contiguous() for k, v in self.buf.items()}, str(tmp),
                  metadata={"layers": json.dumps(self.layers), "layer_convention": "hidden_states"})
        os.replace(tmp, path)
        self.paths.append(path)
        self.buf, self.rows = {}, 0


def _flush(pending: list[tuple[list[int], dict[str, torch.Tensor]]], means: dict[str, torch.Tensor]) -> None:
    """Copy the pending per-batch aggregates to the host result, in input order."""
    if not pending:
        return
    idx = torch.tensor([i for chunk, _ in pending for i in chunk])
    for name in means:
        means[name][idx] = torch.cat([out[name] for _, out in pending]).cpu()
    pending.clear()


def load_token_rows(shards: Sequence[Path], layer: int) -> dict[str, torch.Tensor]:
    """Concatenate the per-token rows of one layer over shards: ``{rows, sample, position, is_response}``."""
    parts = [load_file(str(p)) for p in shards]
    out = {k: torch.cat([p[k] for p in parts]) for k in ("sample", "position", "is_response")}
    out["rows"] = torch.cat([p[f"layer_{layer}"] for p in parts])
    return out


class _Collector:
    """Per-batch state the layer hooks read (masks) and write (aggregates, token rows)."""

    def __init__(self, layers: list[int], aggregates: Sequence[str], norm: torch.nn.Module | None,
                 num_layers: int):
        self.layers, self.aggs, self.norm, self.num_layers = layers, tuple(aggregates), norm, num_layers
        self.slot = {L: i for i, L in enumerate(layers)}
        self.weights: torch.Tensor | None = None  # [b, k, t] fp32 averaging weights
        self.last_idx: torch.Tensor | None = None  # [b] index of the last prompt token
        self.real: torch.Tensor | None = None  # [b, t] bool
        self.out: dict[str, torch.Tensor] = {}  # name -> [b, len(layers), H] fp32
        self.rows: dict[int, torch.Tensor] = {}  # layer -> [tokens, H] (model dtype)
        self.stop_layer = max(layers)

    def record(self, layer: int, h: torch.Tensor) -> None:
        if layer == self.num_layers and self.norm is not None:
            h = self.norm(h)
        i = self.slot[layer]
        if self.weights is not None:
            means = torch.bmm(self.weights, h.float())  # [b, k, H]: fp32 weighted sums
            for j, name in enumerate(n for n in self.aggs if n.endswith("_avg")):
                self.out[name][:, i] = means[:, j]
        if "prompt_last" in self.aggs:
            self.out["prompt_last"][:, i] = h[torch.arange(h.shape[0], device=h.device), self.last_idx].float()
        if "none" in self.aggs:
            self.rows[layer] = h[self.real]
        if layer == self.stop_layer:
            raise _StopForward


def _install_hooks(loaded: LoadedModel, layers: list[int], current: threading.local) -> list:
    """Hooks that hand the layer outputs to the collector of the calling thread (``current.col``);
    threads without one (other work on the same model) pass through."""
    def record(L: int, h: torch.Tensor) -> None:
        col = getattr(current, "col", None)
        if col is not None:
            col.record(L, h)

    handles = []
    blocks = loaded.layers
    for L in layers:
        if L == 0:
            def pre(module, args, kwargs, L=L):
                record(L, args[0] if args else kwargs["hidden_states"])
            handles.append(blocks[0].register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(module, args, output, L=L):
                record(L, output[0] if isinstance(output, tuple) else output)
            handles.append(blocks[L - 1].register_forward_hook(post))
    return handles


def _resolve_layers(layers: Sequence[int] | None, num_layers: int) -> list[int]:
    if layers is None:
        return list(range(num_layers + 1))
    out = sorted(set(int(L) for L in layers))
    if not out or out[0] < 0 or out[-1] > num_layers:
        raise InputError(f"capture layers must lie in 0..{num_layers}, got {list(layers)}")
    return out


def _run_batch(loaded: LoadedModel, col: _Collector, chunk: list[int], prompt_ids, answer_ids,
               lengths: list[int], pad: int, avg_names: list[str], want_rows: bool) -> dict[str, torch.Tensor]:
    """One right-padded forward (no attention mask: causal attention never looks right);
    the hooks fill ``col.out``; returns the per-token rows when ``want_rows``."""
    dev = loaded.device
    b, width = len(chunk), lengths[chunk[0]]
    ids = torch.full((b, width), pad, dtype=torch.long)
    for r, i in enumerate(chunk):
        ids[r, :lengths[i]] = torch.tensor(list(prompt_ids[i]) + list(answer_ids[i]))
    plen = torch.tensor([len(prompt_ids[i]) for i in chunk], device=dev)
    tlen = torch.tensor([lengths[i] for i in chunk], device=dev)
    pos = torch.arange(width, device=dev)[None]
    col.real = pos < tlen[:, None]
    masks = {"prompt_avg": pos < plen[:, None], "response_avg": (pos >= plen[:, None]) & col.real}
    if avg_names:
        w = torch.stack([masks[a].float() for a in avg_names], 1)  # [b, k, t]
        col.weights = w / w.sum(-1, keepdim=True).clamp(min=1)
    col.last_idx = plen - 1
    col.out = {a: torch.empty(b, len(col.layers), loaded.hidden_size, device=dev)
               for a in col.aggs if a != "none"}
    col.rows = {}
    try:
        loaded.backbone(input_ids=ids.to(dev), use_cache=False)
    except _StopForward:
        pass
    if not want_rows:
        return {}
    rows = {f"layer_{L}": col.rows[L] for L in col.layers}
    rows.update(sample=torch.tensor(chunk, device=dev)[:, None].expand(b, width)[col.real],
                position=pos.expand(b, width)[col.real],
                is_response=(pos >= plen[:, None]).expand(b, width)[col.real].to(torch.uint8))
    return rows


def _cpu_workers(device: torch.device) -> tuple[int, int]:
    """``(workers, threads each)``: one worker on accelerators; on the CPU up to
    ``MAX_CPU_WORKERS`` workers sharing torch's thread count."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads < 2:
        return 1, threads
    workers = min(threads, MAX_CPU_WORKERS)
    return workers, threads // workers


def _in_order(fn: Callable[[list[int]], tuple], batches: list[list[int]], workers: int,
              threads_each: int) -> Iterator[tuple]:
    """``fn(batch)`` for every batch, results yielded in batch order. With several workers at
    most two batches per worker are in flight (bounded memory); torch's thread count, which
    each worker sets for itself, is restored afterwards."""
    if workers == 1:
        yield from map(fn, batches)
        return
    threads = torch.get_num_threads()

    def run(batch: list[int]) -> tuple:
        torch.set_num_threads(threads_each)
        with torch.inference_mode():
            return fn(batch)

    pool = ThreadPoolExecutor(workers, thread_name_prefix="capture")
    queue: deque[Future] = deque()
    try:
        for batch in batches:
            queue.append(pool.submit(run, batch))
            if len(queue) >= 2 * workers:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


@torch.inference_mode()
def capture_tokens(loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]], answer_ids: Sequence[Sequence[int]],
                   layers: Sequence[int] | None = None, aggregates: Sequence[str] = AGGREGATES,
                   token_budget: int = 8192, max_batch: int = 1024, shard_dir: Path | str | None = None,
                   shard_tokens: int = 65536, desc: str = "activations", progress: bool = True,
                   compile_blocks: bool | None = None) -> CaptureResult:
    """Capture activations of ``prompt + answer`` token sequences.

    ``layers``: hidden-state indices (default all ``0..num_layers``); the forward stops after
    the largest. ``aggregates``: any of ``prompt_avg``, ``response_avg``, ``prompt_last`` (each
    ``[n, len(layers), H]`` fp32 on the CPU, in input order) and ``none`` (every real token's
    row written to safetensors shards under ``shard_dir``). An empty answer gives a zero
    ``response_avg``; an empty prompt is an error. ``compile_blocks`` (default: on CUDA) runs the
    decoder blocks through ``torch.compile``: fused elementwise work, 1.5-1.6x on an H200
    (bench/RESULTS.md); the first call of a model in a process compiles, and a failed compile
    falls back to eager blocks.
    """
    if len(prompt_ids) != len(answer_ids):
        raise InputError("prompts and answers differ in length")
    bad = [a for a in aggregates if a not in ALL_AGGREGATES]
    if bad or not aggregates:
        raise InputError(f"aggregates: expected some of {ALL_AGGREGATES}, got {list(aggregates)}")
    if "none" in aggregates and shard_dir is None:
        raise InputError("aggregate 'none' needs shard_dir")
    if any(len(p) == 0 for p in prompt_ids):
        raise InputError("every sample needs at least one prompt token")
    loaded.activate()
    compile_blocks = loaded.device.type == "cuda" if compile_blocks is None else compile_blocks
    n, hidden = len(prompt_ids), loaded.hidden_size
    layer_list = _resolve_layers(layers, loaded.num_layers)
    norm = final_norm(loaded)
    avg_names = [a for a in aggregates if a.endswith("_avg")]
    result = CaptureResult(layers=layer_list)
    result.means = {a: torch.zeros(n, len(layer_list), hidden) for a in aggregates if a != "none"}
    writer = _ShardWriter(Path(shard_dir), layer_list, shard_tokens) if "none" in aggregates else None
    lengths = [len(p) + len(a) for p, a in zip(prompt_ids, answer_ids)]
    pad = getattr(loaded.tokenizer, "pad_token_id", None) or 0
    workers, threads_each = (1, 0) if compile_blocks else _cpu_workers(loaded.device)
    if loaded.device.type == "cpu":
        token_budget = min(token_budget, CPU_TOKEN_BUDGET)
    current = threading.local()

    def run(chunk: list[int]) -> tuple[list[int], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        current.col = col = _Collector(layer_list, aggregates, norm, loaded.num_layers)
        try:
            rows = _run_batch(loaded, col, chunk, prompt_ids, answer_ids, lengths, pad, avg_names,
                              want_rows=writer is not None)
        finally:
            current.col = None
        return chunk, col.out, rows

    pending: list[tuple[list[int], dict[str, torch.Tensor]]] = []
    pending_bytes = 0
    with contextlib.ExitStack() as stack:
        for h in _install_hooks(loaded, layer_list, current):
            stack.callback(h.remove)
        running = loaded.layers[:max(layer_list)]  # the blocks before the last requested layer
        if compile_blocks:
            stack.enter_context(compiled_blocks(running))
        elif PACK_LINEARS:
            stack.enter_context(packed_linears(running))
        batches = plan_batches(lengths, token_budget, max_batch)
        for chunk, out, rows in tqdm(_in_order(run, batches, workers, threads_each), total=len(batches),
                                     desc=desc, unit="batch", leave=False, disable=not progress):
            # aggregates stay on the device for a while: fewer host syncs, bounded memory
            pending.append((chunk, out))
            pending_bytes += sum(t.numel() * 4 for t in out.values())
            if pending_bytes > _PENDING_BYTES:
                _flush(pending, result.means)
                pending_bytes = 0
            if writer is not None:
                writer.add(rows)
            result.num_tokens += sum(lengths[i] for i in chunk)
        _flush(pending, result.means)
    if writer is not None:
        writer.flush()
        result.shards = writer.paths
    return result


def capture(loaded: LoadedModel, prompts: list[str], answers: list[str], **kwargs) -> CaptureResult:
    """:func:`capture_tokens` on rendered prompt texts and answer texts (tokenised without extra specials)."""
    tok = loaded.tokenizer
    return capture_tokens(loaded, [encode(tok, p) for p in prompts], [encode(tok, a) for a in answers], **kwargs)


def capture_means(loaded: LoadedModel, prompts: list[str], answers: list[str], batch_size: int = 16,
                  desc: str = "activations", token_budget: int | None = None) -> dict[str, torch.Tensor]:
    """Return ``{prompt_avg, response_avg, prompt_last}``, each ``[n, num_layers+1, hidden]`` float32.

    ``batch_size`` caps the rows per batch; ``token_budget`` (default ``batch_size x 1024``)
    caps the padded tokens per batch.
    """
    if len(prompts) != len(answers):
        raise ValueError("prompts and answers differ in length")
    res = capture(loaded, prompts, answers, aggregates=AGGREGATES, max_batch=batch_size,
                  token_budget=token_budget or batch_size * 1024, desc=desc)
    return res.means
