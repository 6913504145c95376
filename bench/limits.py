"""The hardware limits a benchmark is measured against, in the same run: copy bandwidth, bf16
GEMM rate, and the fastest a model's decode step or forward could run at them.

Decode: a step reads every weight once (the input embedding table excepted: a step reads a few
rows of it; a head tied to it is read whole, as the head) and each row's real keys and values;
its matrix products do ``2 x rows x weights`` FLOPs plus attention's ``4 x rows x context x
query width`` per layer. A forward over sequences does ``2 x tokens x weights`` of the blocks it
runs plus causal attention's ``2 x L (L + 1) x query width`` per sequence and block. The bound
of a step is the larger of its bytes over the copy bandwidth and its FLOPs over the GEMM rate.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from persona_ops.models.loading import LoadedModel


def copy_bandwidth(device: str) -> float:
    """Bytes per second of a large device-to-device copy (read + write)."""
    if device != "cuda":
        return float("nan")
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * 10 * x.numel() / (time.perf_counter() - t0)


def gemm_rate(device: str, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of an ``n x n x n`` bf16 matrix product on the GPU (best of three timed loops)."""
    if device != "cuda":
        return float("nan")
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * n ** 3 / best


def _dims(loaded: LoadedModel) -> tuple[int, int, int]:
    """(query width, kv width, layers) of the model's attention."""
    cfg = loaded.model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim, cfg.num_hidden_layers


def step_weights(loaded: LoadedModel) -> tuple[int, int]:
    """(bytes, parameters) a decode step reads: every weight but an untied input embedding table."""
    model = loaded.model
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embed.data_ptr()
    params = [p for p in model.parameters() if tied or p.data_ptr() != embed.data_ptr()]
    return sum(p.numel() * p.element_size() for p in params), sum(p.numel() for p in params)


def decode_step(loaded: LoadedModel, rows: int, context: float) -> tuple[float, float]:
    """(FLOPs, bytes) of a decode step of ``rows`` rows over ``context`` cached tokens each."""
    q_width, kv_width, layers = _dims(loaded)
    weight_bytes, params = step_weights(loaded)
    dtype_bytes = next(loaded.model.parameters()).element_size()
    kv_bytes = rows * context * 2 * kv_width * layers * dtype_bytes
    return 2 * rows * params + 4 * rows * context * q_width * layers, weight_bytes + kv_bytes


def decode_bound(loaded: LoadedModel, prompt_lengths: Sequence[int], new_tokens: int, bandwidth: float,
                 gemm: float) -> float:
    """New tokens per second of decoding these rows at the limits, at the mean context of the steps."""
    rows = len(prompt_lengths)
    flops, nbytes = decode_step(loaded, rows, sum(prompt_lengths) / rows + new_tokens / 2)
    return rows / max(flops / gemm, nbytes / bandwidth)


def forward_flops(loaded: LoadedModel, lengths: Sequence[int], blocks: int | None = None) -> float:
    """Matrix-product FLOPs of a causal forward over sequences of ``lengths`` through the first
    ``blocks`` decoder blocks (default all; no LM head)."""
    q_width, _, layers = _dims(loaded)
    blocks = layers if blocks is None else blocks
    per_block = sum(p.numel() for p in loaded.layers[0].parameters() if p.ndim == 2)
    tokens, pairs = sum(lengths), sum(L * (L + 1) for L in lengths)
    return blocks * (2 * tokens * per_block + 2 * pairs * q_width)


def generation_seconds(loaded: LoadedModel, prompt_lengths: Sequence[int], new_tokens: int, batch: int,
                       bandwidth: float, gemm: float) -> dict:
    """The fastest generation of ``new_tokens`` per prompt in the engine's length-sorted batches of
    ``batch``: each batch's prefill at the GEMM rate, then its decode steps at their bound. Returns
    those seconds, the prefill's, and the decode steps' at the GEMM rate and at the bandwidth alone."""
    lengths = sorted(prompt_lengths)
    out = dict.fromkeys(("seconds", "prefill_seconds", "decode_compute_seconds", "decode_memory_seconds"), 0.0)
    steps = new_tokens - 1
    for start in range(0, len(lengths), batch):
        chunk = lengths[start:start + batch]
        flops, nbytes = decode_step(loaded, len(chunk), sum(chunk) / len(chunk) + new_tokens / 2)
        prefill = forward_flops(loaded, chunk) / gemm
        out["prefill_seconds"] += prefill
        out["decode_compute_seconds"] += steps * flops / gemm
        out["decode_memory_seconds"] += steps * nbytes / bandwidth
        out["seconds"] += prefill + steps * max(flops / gemm, nbytes / bandwidth)
    return out
