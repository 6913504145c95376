"""Fused decode attention over the engine's static KV cache (Triton; CUDA, or Triton's interpreter).

One kernel per layer and decode step: it writes the new token's key/value into column
``slot`` of the cache (one for all rows, or one per row) and attends over each row's real
columns only, ``[start[b], slot]`` (left padding before ``start`` and the unfilled columns
after ``slot`` are never read).
Replaces a masked attention over every cache column plus two cache writes: on OLMo-2-7B
(no grouped KV heads) the static cache is as large as 40% of the weights, so reading only
real columns is most of the gain. Softmax is online, in fp32; ``q . k`` accumulates in fp32.
One program per (row, kv head) handles the ``G`` query heads of that group together. Its loop
runs over the row's real blocks only (runtime bounds, so one compile serves every cache length),
with the next block's keys and values loaded while the current one is reduced (two stages): on
an H200 that reads a step's cache 1.1-1.2x as fast as a loop over every block with a skip test
(bench/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK, STAGES = 64, 2  # cache columns per iteration; blocks in flight (the best of 3 x 3 x 3 tried on an H200)


@triton.jit
def _decode_kernel(q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, start_ptr, slot_ptr, slot_stride, out_ptr, scale,
                   sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_s, so_b, so_h,
                   G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                   BLOCK_S: tl.constexpr, NUM_STAGES: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    offs_g = tl.arange(0, GP)
    offs_d = tl.arange(0, DP)
    dmask = offs_d < D
    gmask = offs_g < G
    q = tl.load(q_ptr + b * sq_b + (hk * G + offs_g)[:, None] * sq_h + offs_d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    kn = tl.load(kn_ptr + b * sk_b + hk * sk_h + offs_d, mask=dmask, other=0.0)
    vn = tl.load(vn_ptr + b * sv_b + hk * sv_h + offs_d, mask=dmask, other=0.0)
    slot = tl.load(slot_ptr + b * slot_stride)
    start = tl.load(start_ptr + b)
    cache = b * sc_b + hk * sc_h
    tl.store(k_ptr + cache + slot * sc_s + offs_d, kn, mask=dmask)
    tl.store(v_ptr + cache + slot * sc_s + offs_d, vn, mask=dmask)
    # the new token opens the online softmax: m = its score, l = 1, acc = its value
    m = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], axis=1) * scale
    l = tl.full([GP], 1.0, tl.float32)
    acc = tl.zeros([GP, DP], tl.float32) + vn.to(tl.float32)[None, :]
    for s0 in tl.range(start // BLOCK_S * BLOCK_S, slot, BLOCK_S, num_stages=NUM_STAGES):  # real blocks only
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = (offs_s >= start) & (offs_s < slot)
        ptrs = cache + offs_s[:, None] * sc_s + offs_d[None, :]
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + ptrs, mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m = m_new
    out = acc / l[:, None]
    tl.store(out_ptr + b * so_b + (hk * G + offs_g)[:, None] * so_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def fused_decode_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, keys: torch.Tensor,
                           values: torch.Tensor, start: torch.Tensor, slot: torch.Tensor, scale: float
                           ) -> torch.Tensor:
    """Store ``k_new, v_new`` at column ``slot`` and attend over ``[start[b], slot]`` of each row.

    ``q [B, H, 1, D]``, ``k_new/v_new [B, Hkv, 1, D]`` (any strides),
    ``keys/values [B, Hkv, S, D]`` contiguous, ``start [B]`` and ``slot`` (``[1]``, or ``[B]``: a column
    per row) integer tensors.
    Returns ``[B, 1, H, D]``.
    """
    b, h, _, d = q.shape
    hkv = keys.shape[1]
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise ValueError("fused_decode_attention: the caches must be contiguous")
    q, k_new, v_new = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_new, v_new))
    out = q.new_empty(b, 1, h, d)
    group = h // hkv
    _decode_kernel[(b, hkv)](
        q, k_new, v_new, keys, values, start, slot, 1 if slot.numel() > 1 else 0, out, scale,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
        keys.stride(0), keys.stride(1), keys.stride(2), out.stride(0), out.stride(2),
        G=group, GP=max(16, triton.next_power_of_2(group)),  # tl.dot needs >= 16 rows
        D=d, DP=max(16, triton.next_power_of_2(d)), BLOCK_S=BLOCK, NUM_STAGES=STAGES, num_warps=4)
    return out
