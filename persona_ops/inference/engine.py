"""Steered generation engine: own decode loop over a static KV cache (CUDA graphs on GPU).

The HF model does the maths (embeddings, blocks, norms, LM head); the engine owns the KV
cache and the attention over it. It registers an attention function with transformers'
``AttentionInterface`` that, while the engine runs, writes each layer's new keys/values into
preallocated buffers ``[B, kv_heads, S, head_dim]`` and attends over them with a mask the
engine keeps. The model is called with ``use_cache=False`` and a ready 4-D mask, so nothing
in HF's forward depends on Python-side cache state or syncs with the host. On CUDA the decode
step (one forward with its steering hooks) is captured as a CUDA graph once per batch shape and
replayed, also by later calls of that shape (the cache, the step's inputs and the steering values
live in a workspace kept with the model: the last one, up to 1/16 of the device's memory), and
each layer's decode attention is one Triton kernel that writes the new key/value
and reads only the row's real columns (:mod:`persona_ops.kernels.triton_attention`); sampling runs on
fp32 logits on the device. On CPU the same loop runs eagerly, attending only over the filled
part of the cache.

Attention logit softcapping and sliding windows (Gemma-2) follow HF's eager attention: scores
``softcap * tanh(scores / softcap)`` before the mask, in fp32 (explicit matmul attention: SDPA
and the Triton kernel have neither), and on sliding layers a query sees the keys among the last
``sliding_window`` positions, itself included. Window distances are position ids, kept per
cache column and per decode step in tensors, so the captured decode step stays static.

Left padding: prompts are right-aligned; padding columns are masked out of every attention
and never steered (see :mod:`persona_ops.interp.interventions` for the positions semantics); each
row's position ids count its real tokens only, as in HF ``generate``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from persona_ops.chat import encode
from persona_ops.errors import InputError
from persona_ops.inference.sampling import SamplingParams, sample_next
from persona_ops.interp.interventions import Intervention, Steerer
from persona_ops.kernels.compile import compiled_blocks
from persona_ops.kernels.cpu_linear import packed_linears
from persona_ops.kernels.fused_projections import fused_projections
from persona_ops.models.loading import LoadedModel

log = logging.getLogger(__name__)
ATTN_NAME = "persona_ops_static_kv"
_ACTIVE: "KVStore | None" = None  # the store the attention function writes to, while the engine runs
STATS = {"graph_captures": 0, "graph_fallbacks": 0, "capture_seconds": 0.0}  # observability for benches and logs
FUSED_DECODE = True  # CUDA: Triton decode attention (benches switch it off for an ablation)
_PREFILL_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
_WARMED: set = set()  # (model id, compiled, fused attention, batch, cache length): decode steps already run once
_SIDE_STREAMS: dict[int, "torch.cuda.Stream"] = {}  # per device: where warm-ups and captures run
_SCORES_BUDGET = 1 << 26  # fp32 scores per chunk of the explicit prefill attention (256 MiB)
# attention arguments HF passes for features the engine does not implement: the feature's name
_UNSUPPORTED = {"s_aux": "attention sinks", "sinks": "attention sinks", "position_bias": "a relative position bias"}


class KVStore:
    """Per-layer key/value buffers ``[B, kv_heads, max_len, head_dim]`` of one batch.

    Prefill runs in row groups (length-sorted rows, little padding); each group writes its
    rows ``rows`` and the right-aligned columns ``cols`` of the buffers, which are allocated on
    the first group's forward. Decode steps write column ``slot`` of every row. ``positions``
    (each column's position id) and ``step_pos`` (the decode token's) place sliding windows.
    """

    def __init__(self, batch: int, max_len: int, kv_len: int | None = None):
        self.batch, self.max_len = batch, max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.prefill = True
        self.rows, self.cols = slice(None), slice(None)  # where the current prefill group writes
        self.slot: torch.Tensor | None = None  # [1] long: column the next decode token is written to
        self.kv_len: int | None = kv_len  # eager decode: attend over the first kv_len columns only
        self.start: torch.Tensor | None = None  # [B] first real column of each row (left padding before it)
        self.fused = False  # decode attention through the Triton kernel (reads columns start..slot only)
        self.positions: torch.Tensor | None = None  # [B, max_len] long: position id of each column
        self.step_pos: torch.Tensor | None = None  # [B, 1] long: position id of the decode token
        self.shift: torch.Tensor | None = None  # [rows] prefill of left-padded rows into left-aligned ones
        self.prefill_pos: torch.Tensor | None = None  # [rows, cols] position ids of that prefill

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               scale: float | None, softcap: float | None = None, window: int | None = None) -> torch.Tensor:
        """Store ``k, v`` and attend. ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``; returns ``[B, T, H, D]``.

        ``softcap`` caps the scores (``softcap * tanh(s / softcap)``); ``window`` limits each query
        to the keys among its last ``window`` positions."""
        b, h, t, d = q.shape
        hkv = k.shape[1]
        group = h // hkv
        if self.prefill:
            if layer not in self.keys:
                self.keys[layer] = k.new_zeros(self.batch, hkv, self.max_len, d)
                self.values[layer] = v.new_zeros(self.batch, hkv, self.max_len, v.shape[-1])
            kw, vw = (k, v) if self.shift is None else (_roll_left(k, self.shift), _roll_left(v, self.shift))
            self.keys[layer][self.rows, :, self.cols] = kw
            self.values[layer][self.rows, :, self.cols] = vw
            if window is not None:
                pos = self.positions[self.rows, self.cols] if self.prefill_pos is None else self.prefill_pos
                mask = _window_mask(mask, pos, pos, window)
            if softcap is not None:
                return prefill_attention(q, k, v, mask, scale or d ** -0.5, softcap).transpose(1, 2)
            if group > 1:
                k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            with sdpa_kernel(_PREFILL_BACKENDS):  # deterministic forward kernels with a mask
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return out.transpose(1, 2)
        keys, values = self.keys[layer][:b], self.values[layer][:b]  # a decode step may run the first rows only
        if self.fused and softcap is None and window is None:
            return _fused_attention()(q, k, v, keys, values, self.start, self.slot, scale or d ** -0.5)
        if self.slot.numel() == 1:
            keys.index_copy_(2, self.slot, k)
            values.index_copy_(2, self.slot, v)
        else:  # a column per row
            rows = torch.arange(b, device=k.device)
            keys[rows, :, self.slot] = k[:, :, 0]
            values[rows, :, self.slot] = v[:, :, 0]
        positions = self.positions[:b]
        if self.kv_len is not None:
            keys, values, mask = keys[:, :, :self.kv_len], values[:, :, :self.kv_len], mask[..., :self.kv_len]
            positions = positions[:, :self.kv_len]
        if window is not None:
            mask = _window_mask(mask, self.step_pos, positions, window)
        # one query token: fold the query heads of a kv group into the query axis (no kv repeat)
        out = decode_attention(q.reshape(b, hkv, group * t, d), keys, values, mask, scale or d ** -0.5, softcap)
        return out.reshape(b, h, t, -1).transpose(1, 2)


def _roll_left(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x [B, H, T, D]`` with row ``b``'s columns moved ``shift[b]`` to the left (cyclically)."""
    t = x.shape[2]
    cols = (torch.arange(t, device=x.device)[None] + shift[:, None]) % t
    return x.gather(2, cols[:, None, :, None].expand_as(x))


def _window_mask(mask: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Additive ``mask [B, 1, T, S]`` with the keys ``window`` or more positions before their
    query masked out (HF's sliding window: ``kv_idx > q_idx - sliding_window``).
    ``q_pos [B, T]`` and ``k_pos [B, S]`` are position ids."""
    far = q_pos[:, None, :, None] - k_pos[:, None, None, :] >= window
    return mask.masked_fill(far, torch.finfo(mask.dtype).min)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float, softcap: float | None = None) -> torch.Tensor:
    """Attention of a few query rows per kv head over the cache, as two batched matrix-vector
    products (deterministic; on CPU, and on CUDA where Triton is missing).
    ``q [B, Hkv, G, D]``, ``keys/values [B, Hkv, S, D]``, additive ``mask [B, 1, 1, S]`` (any
    leading dimensions that broadcast); ``softcap`` caps the scores before the mask."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores + mask.float()
    return torch.matmul(scores.softmax(-1).to(values.dtype), values)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                      softcap: float | None) -> torch.Tensor:
    """Masked attention as explicit matmuls (logit softcapping, which SDPA lacks), in query chunks
    of bounded fp32 score size. ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``, additive
    ``mask [B, 1, T, T]``; returns ``[B, H, T, D]``."""
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, h // hkv, t, d)  # the query heads of a kv group share its keys (no kv repeat)
    k, v, mask = k[:, :, None], v[:, :, None], mask[:, :, None]
    step = max(1, _SCORES_BUDGET // (b * h * t))
    out = [decode_attention(q[..., i:i + step, :], k, v, mask[..., i:i + step, :], scale, softcap)
           for i in range(0, t, step)]
    return torch.cat(out, -2).reshape(b, h, t, -1)


@functools.cache
def _fused_attention():
    """The Triton decode attention, or None where Triton cannot be imported."""
    try:
        from persona_ops.kernels.triton_attention import fused_decode_attention
    except ImportError as e:
        log.warning("Triton is unavailable (%s): decode attention reads the whole cache", e)
        return None
    return fused_decode_attention


def prefill_groups(lengths: Sequence[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive row ranges ``[r0, r1)`` of ascending ``lengths`` whose padded size
    ``rows x longest`` stays within ``budget`` tokens (a row longer than it goes alone)."""
    groups, start = [], 0
    for r in range(1, len(lengths) + 1):
        if r == len(lengths) or (r + 1 - start) * lengths[r] > budget:
            groups.append((start, r))
            start = r
    return groups


@torch.compiler.disable  # compiled decoder blocks call it eagerly: the store is Python state
def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """AttentionInterface entry: the engine's static-cache attention while it runs, else SDPA."""
    store = _ACTIVE
    if store is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    for name, feature in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            model = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
            raise InputError(f"{model} attention uses {feature} ({name}), which the generation engine "
                             "does not support")
    return store.attend(module.layer_idx, query, key, value, attention_mask, scaling,
                        softcap=kwargs.get("softcap"), window=kwargs.get("sliding_window")), None


AttentionInterface.register(ATTN_NAME, _attention)


_CONFIGS: "weakref.WeakKeyDictionary[torch.nn.Module, list]" = weakref.WeakKeyDictionary()


def _configs(model: torch.nn.Module) -> list:
    """The distinct configs of ``model``'s modules (walked once per model: a walk costs milliseconds)."""
    if model not in _CONFIGS:
        _CONFIGS[model] = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
    return _CONFIGS[model]


@contextlib.contextmanager
def _engine_attention(model: torch.nn.Module, store: KVStore) -> Iterator[None]:
    global _ACTIVE
    saved = [(c, c._attn_implementation) for c in _configs(model)]
    for c, _ in saved:
        c._attn_implementation = ATTN_NAME
    _ACTIVE = store
    try:
        yield
    finally:
        _ACTIVE = None
        for c, impl in saved:
            c._attn_implementation = impl


def stop_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids of the tokenizer and the generation config."""
    ids: set[int] = set()
    gen_cfg = getattr(loaded.model, "generation_config", None)
    tok = loaded.tokenizer
    for tid in (getattr(tok, "eos_token_id", None), getattr(gen_cfg, "eos_token_id", None)):
        if isinstance(tid, int):
            ids.add(tid)
        elif isinstance(tid, (list, tuple)):
            ids.update(int(t) for t in tid)
    return sorted(ids)


def prefill_bias(real: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask ``[B, 1, T, T]`` of a left-padded prefill (``real [B, T]``: the real tokens):
    causal over real keys; each position sees itself, so padding rows stay finite."""
    width = real.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    allowed = (causal[None] & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=real.device)[None]
    return torch.zeros(real.shape[0], 1, width, width, dtype=dtype, device=real.device).masked_fill(
        ~allowed[:, None], torch.finfo(dtype).min)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def open_column(bias: torch.Tensor, slot: torch.Tensor) -> None:
    """Unmask column ``slot`` (``[1]``: the same for every row; ``[B]``: one per row) of ``bias [B, 1, 1, S]``."""
    if slot.numel() == 1:
        bias.index_fill_(-1, slot, 0.0)
    else:
        bias.scatter_(-1, slot.view(-1, 1, 1, 1), 0.0)


class _DecodeStep:
    """One decode forward over static inputs; replayed from a CUDA graph when ``graph``."""

    def __init__(self, model: torch.nn.Module, tok: torch.Tensor, pos: torch.Tensor, bias: torch.Tensor,
                 store: KVStore, graph: bool, blocks: Sequence[torch.nn.Module] = ()):
        self.model, self.tok, self.pos, self.bias, self.store = model, tok, pos, bias, store
        self.blocks = blocks  # compiled (torch.compile) for the captured step when given
        self.store_shape = (tok.shape[0], bias.shape[-1])
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        if graph:
            t0 = time.perf_counter()
            try:
                self._capture()
                STATS["graph_captures"] += 1
            except Exception as e:  # an optimisation: retry plain blocks and attention, then decode eagerly
                log.warning("CUDA graph capture failed (%s: %s)", type(e).__name__, e)
                STATS["graph_fallbacks"] += 1
                self.graph = None
                if self.blocks or self.store.fused:
                    self.blocks, self.store.fused = (), False
                    try:
                        self._capture()
                        STATS["graph_captures"] += 1
                    except Exception as e2:
                        log.warning("CUDA graph capture failed again (%s); decoding eagerly", e2)
                        self.graph = None
            STATS["capture_seconds"] += time.perf_counter() - t0

    def _forward(self) -> torch.Tensor:
        open_column(self.bias, self.store.slot)  # the new token's column becomes visible
        out = self.model(input_ids=self.tok, position_ids=self.pos, attention_mask=self.bias, use_cache=False)
        return out.logits[:, -1].float()

    def _capture(self) -> None:
        # warm-up on a side stream (allocator, cuBLAS handles, compilation), then capture; the
        # warm-up only rewrites the current slot, which the first real step writes again before
        # reading it. A shape already warmed in this process is captured straight away (one
        # long-lived side stream keeps its cuBLAS state). Compiled blocks are baked into the
        # graph; their Python wrappers go after.
        with compiled_blocks(self.blocks):
            dev = self.tok.device.index or 0
            if dev not in _SIDE_STREAMS:
                _SIDE_STREAMS[dev] = torch.cuda.Stream(device=dev)
            side = _SIDE_STREAMS[dev]
            side.wait_stream(torch.cuda.current_stream())
            key = (id(self.model), bool(self.blocks), self.store.fused, *self.store_shape)
            if key not in _WARMED:
                with torch.cuda.stream(side):
                    for _ in range(2):  # compilation settles on the first
                        self._forward()
                _WARMED.add(key)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, stream=side):
                self.logits = self._forward()
            torch.cuda.current_stream().wait_stream(side)

    def __call__(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        if self.store.kv_len is not None:
            self.store.kv_len = int(self.store.slot.max()) + 1
        return self._forward()


def _model_state(model: torch.nn.Module) -> tuple:
    """What a captured decode step bakes in besides its input tensors: where the parameters live,
    each adapter layer's active adapters and switches, and how many hooks each module has."""
    tuner = sys.modules["peft.tuners.tuners_utils"].BaseTunerLayer if "peft.tuners.tuners_utils" in sys.modules \
        else ()  # no adapter layers exist before PEFT is imported
    state: list = [p.data_ptr() for p in model.parameters()]
    for m in model.modules():
        state.append((len(m._forward_hooks), len(m._forward_pre_hooks)))
        if isinstance(m, tuner):
            state.append((tuple(m.active_adapters), m.disable_adapters, m.merged))
    return tuple(state)


class _Workspace:
    """The static decode tensors of one batch shape (cache, inputs, mask, pinned steering) and its
    decode step, kept on the model so the next call of that shape replays the captured graph."""

    def __init__(self, b: int, max_len: int, dev: torch.device, dtype: torch.dtype, fused: bool):
        long = dict(dtype=torch.long, device=dev)
        self.store = KVStore(b, max_len)
        self.store.fused = fused
        self.store.start = torch.zeros(b, **long)
        self.store.positions = torch.zeros(b, max_len, **long)
        self.store.slot = torch.zeros(1, **long)
        self.store.step_pos = torch.zeros(b, 1, **long)
        self.tok = torch.zeros(b, 1, **long)
        self.bias = torch.empty(b, 1, 1, max_len, dtype=dtype, device=dev)
        self.steering: list | None = None  # Steerer.pin slots
        self.step: _DecodeStep | None = None  # made at the first decode

    def nbytes(self) -> int:
        """Bytes of its KV cache."""
        return sum(t.numel() * t.element_size() for d in (self.store.keys, self.store.values) for t in d.values())


def _workspace(model: torch.nn.Module, key: tuple, make) -> _Workspace:
    """The model's workspace for ``key``, or a new one replacing the one it had (freed first, so
    one batch's cache is the most a model holds). Kept as an attribute of the model, so it is
    freed with it."""
    kept = model.__dict__.setdefault("_persona_ops_workspaces", {})
    if key not in kept:
        kept.clear()
        kept[key] = make()
    return kept[key]


def _keep_bytes(dev: torch.device) -> int:
    """The largest workspace kept after a call: 1/16 of the device's memory (a big batch's cache
    is not held while other work needs the memory)."""
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory // 16
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 16


def _release_large_workspace(model: torch.nn.Module, dev: torch.device) -> None:
    kept = model.__dict__.get("_persona_ops_workspaces", {})
    if any(ws.nbytes() > _keep_bytes(dev) for ws in kept.values()):
        kept.clear()


def _generate_batch(loaded: LoadedModel, prompts: list[Sequence[int]], rows: list[int], sampling: SamplingParams,
                    steerer: Steerer | None, eos: torch.Tensor, pad: int, min_new_tokens: int,
                    generator: torch.Generator, graph: bool, compile_blocks: bool, prefill_tokens: int
                    ) -> torch.Tensor:
    """New tokens ``[B, max_new]`` (pad after a row's EOS) for one batch of ascending-length prompts.

    ``rows`` are the prompts' indices into the per-row steering parameters. The prefill runs
    in groups of at most ``prefill_tokens`` padded tokens, so short prompts are not padded to
    the longest; decoding runs all rows together, right-aligned at the longest prompt. The
    cache and the decode step come from the model's workspace of this shape (the captured graph
    of an earlier call is replayed when nothing it baked in has changed).
    """
    model, dev = loaded.model, loaded.device
    dtype = next(model.parameters()).dtype
    b, plen, new = len(prompts), max(len(p) for p in prompts), sampling.max_new_tokens
    ids = torch.full((b, plen), pad, dtype=torch.long)
    real = torch.zeros((b, plen), dtype=torch.bool)
    for r, p in enumerate(prompts):  # left padding
        ids[r, plen - len(p):] = torch.tensor(list(p), dtype=torch.long)
        real[r, plen - len(p):] = True
    ids, real = ids.to(dev), real.to(dev)
    pos = (real.long().cumsum(1) - 1).clamp(min=0)
    neg = torch.finfo(dtype).min
    max_len = _round_up(plen + new, 64)
    fused = dev.type == "cuda" and FUSED_DECODE and _fused_attention() is not None
    key = (b, max_len, dtype, graph, compile_blocks, fused,
           steerer.layout() if steerer is not None else (), _model_state(model))
    ws = _workspace(model, key, lambda: _Workspace(b, max_len, dev, dtype, fused))
    store = ws.store
    store.prefill, store.kv_len = True, None if (graph or fused) else plen
    store.start.copy_((~real).sum(1))
    # decode columns continue each row's positions
    store.positions.copy_(torch.cat([pos, pos[:, -1:] + torch.arange(1, max_len - plen + 1, device=dev)], 1))
    out = torch.full((b, new), pad, dtype=torch.long, device=dev)
    done = torch.zeros(b, dtype=torch.bool, device=dev)

    def pick(logits: torch.Tensor, step: int) -> torch.Tensor:
        if step < min_new_tokens and eos.numel():
            logits[:, eos] = float("-inf")
        nxt = sample_next(logits, sampling.temperature, sampling.top_p, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        done.logical_or_(torch.isin(nxt, eos))
        out[:, step] = nxt
        return nxt

    def prefill(r0: int, r1: int) -> torch.Tensor:
        width = len(prompts[r1 - 1])
        store.rows, store.cols = slice(r0, r1), slice(plen - width, plen)
        g_real, g_ids, g_pos = (x[r0:r1, plen - width:] for x in (real, ids, pos))
        bias = prefill_bias(g_real, dtype)
        if steerer is not None:
            steerer.select_rows(rows[r0:r1])
            last = torch.zeros_like(g_real)
            last[:, -1] = True
            steerer.set_positions(prompt=g_real, response=last)
        return model(input_ids=g_ids, position_ids=g_pos, attention_mask=bias, use_cache=False,
                     logits_to_keep=1).logits[:, -1].float()

    compiled = loaded.layers if compile_blocks else ()
    with _engine_attention(model, store):
        lengths = [len(p) for p in prompts]
        with compiled_blocks(compiled):
            logits = torch.cat([prefill(r0, r1) for r0, r1 in prefill_groups(lengths, prefill_tokens)])
        nxt = pick(logits, 0)
        if new == 1:
            return out
        # static decode inputs, advanced in place with each step
        store.prefill = False
        store.slot.fill_(plen)
        ws.tok.copy_(nxt[:, None])
        store.step_pos.copy_(pos[:, -1:] + 1)
        ws.bias.fill_(neg)
        ws.bias[:, 0, 0, :plen] = torch.where(real, 0.0, neg).to(dtype)
        if steerer is not None:
            steerer.select_rows(rows)
            steerer.set_decode()
            ws.steering = steerer.pin(ws.steering, b)
        if ws.step is None:
            ws.step = _DecodeStep(model, ws.tok, store.step_pos, ws.bias, store, graph,
                                  blocks=compiled if graph else ())
        for step in range(1, new):
            logits = ws.step()
            nxt = pick(logits, step)
            ws.tok.copy_(nxt[:, None])
            store.step_pos.add_(1)
            store.slot.add_(1)
            if eos.numel() and step >= min_new_tokens and step % 16 == 0 and bool(done.all()):
                break
    return out


@torch.inference_mode()
def generate_tokens(loaded: LoadedModel, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams,
                    interventions: Sequence[Intervention] = (), *, min_new_tokens: int = 0,
                    eos_ids: Sequence[int] | None = None, batch_size: int = 256,
                    cuda_graph: bool | None = None, compile_blocks: bool | None = None,
                    prefill_tokens: int | None = None, progress: bool = False) -> list[list[int]]:
    """Generate continuations of token-id prompts; returns each row's new ids (EOS included if hit).

    ``interventions`` apply during prefill and decoding (per-row ``coef``/``tau`` tensors have
    one value per prompt). Prompts are length-sorted into batches of ``batch_size``; one
    seeded generator drives all sampling, so equal inputs give equal outputs. ``cuda_graph``
    defaults to on for CUDA models. ``compile_blocks`` (default: where CUDA graphs are on) runs
    the decoder blocks of the prefill and of the captured decode step through ``torch.compile``:
    fused elementwise work, 1.8x on an H200's steered generation (bench/RESULTS.md); the first
    call of a model in a process compiles (~15 s). A compile that fails falls back to eager blocks.
    Compiled blocks use plain linears (not the CPU's packed ones), and the CPU compiles the prefill only.
    ``eos_ids`` defaults to :func:`stop_ids`; EOS is masked until ``min_new_tokens`` tokens exist.
    ``prefill_tokens`` bounds one prefill forward (padded tokens; default 8192 on CUDA, 1024 on
    CPU, where padding costs as much compute as real tokens).
    Bitwise run-to-run equality on CUDA needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` set before
    CUDA starts (cuBLAS may pick other kernels on the capture stream otherwise).
    """
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    dev = loaded.activate().device
    graph = (dev.type == "cuda") if cuda_graph is None else (cuda_graph and dev.type == "cuda")
    compile_blocks = graph if compile_blocks is None else compile_blocks
    eos_list = stop_ids(loaded) if eos_ids is None else list(eos_ids)
    eos = torch.tensor(eos_list, dtype=torch.long, device=dev)
    tok = loaded.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    pad = pad if pad is not None else (eos_list[0] if eos_list else 0)
    generator = torch.Generator(device=dev).manual_seed(sampling.seed)
    prefill_tokens = prefill_tokens or (8192 if dev.type == "cuda" else 1024)
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in prompt_ids]
    steerer = Steerer(loaded.layers, interventions, num_rows=len(prompt_ids)) if interventions else None
    eos_set = set(eos_list)
    packed = contextlib.nullcontext() if compile_blocks else packed_linears(loaded.model)  # compile traces F.linear
    with (steerer if steerer is not None else contextlib.nullcontext(), packed,
          fused_projections(loaded.model)):
        for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", leave=False,
                          disable=not progress):
            chunk = order[start:start + batch_size]
            new = _generate_batch(loaded, [prompt_ids[i] for i in chunk], chunk, sampling, steerer, eos, pad,
                                  min_new_tokens, generator, graph, compile_blocks, prefill_tokens).cpu().tolist()
            for r, i in enumerate(chunk):
                row = new[r]
                cut = next((j + 1 for j, t in enumerate(row) if t in eos_set), len(row))
                results[i] = row[:cut]
    _release_large_workspace(loaded.model, dev)
    return results


def generate_text(loaded: LoadedModel, prompts: Sequence[str], sampling: SamplingParams,
                  interventions: Sequence[Intervention] = (), **kwargs) -> list[str]:
    """:func:`generate_tokens` on rendered prompt texts; returns the decoded answers."""
    tok = loaded.tokenizer
    ids = generate_tokens(loaded, [encode(tok, p) for p in prompts], sampling, interventions, **kwargs)
    return [tok.decode(row, skip_special_tokens=True).strip() for row in ids]
