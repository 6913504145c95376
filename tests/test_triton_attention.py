"""The fused Triton decode attention equals the engine's matmul decode attention.

Runs on CUDA when there is one, else in Triton's interpreter on CPU (the test extra installs
Triton; conftest switches the interpreter on); skipped only where Triton cannot be installed.
"""

from __future__ import annotations

import pytest
import torch

triton_attention = pytest.importorskip("persona_ops.kernels.triton_attention", exc_type=ImportError)

from persona_ops.inference.engine import decode_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float16  # the interpreter has no bf16


def _case(b, hkv, group, s, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = hkv * group
    q = torch.randn(b, 1, h, d, generator=g).to(DEV, dtype).transpose(1, 2)  # HF layout: strided
    k_new = torch.randn(b, 1, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2)
    v_new = torch.randn(b, 1, hkv, d, generator=g).to(DEV, dtype).transpose(1, 2)
    keys = torch.randn(b, hkv, s, d, generator=g).to(DEV, dtype)
    values = torch.randn(b, hkv, s, d, generator=g).to(DEV, dtype)
    return q, k_new, v_new, keys, values


def _reference(q, k_new, v_new, keys, values, start, slot, scale):
    keys, values = keys.clone(), values.clone()
    keys.index_copy_(2, slot, k_new)
    values.index_copy_(2, slot, v_new)
    b, h, _, d = q.shape
    hkv, s = keys.shape[1], keys.shape[2]
    col = torch.arange(s, device=q.device)
    visible = (col[None] >= start[:, None]) & (col[None] <= slot)
    mask = torch.where(visible, 0.0, float("-inf"))[:, None, None, :]
    out = decode_attention(q.float().reshape(b, hkv, h // hkv, d), keys.float(), values.float(), mask, scale)
    return out.reshape(b, h, 1, d).transpose(1, 2), keys, values


@pytest.mark.parametrize("hkv,group,d", [(2, 2, 16), (3, 1, 32), (1, 5, 24)])
def test_matches_masked_matmul_attention_fp32(hkv, group, d):
    q, k_new, v_new, keys, values = _case(3, hkv, group, 150, d, torch.float32)
    start = torch.tensor([0, 37, 90], device=DEV)  # rows with 0, 37 and 90 columns of left padding
    slot = torch.tensor([131], device=DEV)  # several blocks, the last one partly filled
    want, want_k, want_v = _reference(q, k_new, v_new, keys, values, start, slot, d ** -0.5)
    got = triton_attention.fused_decode_attention(q, k_new, v_new, keys, values, start, slot, d ** -0.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys, want_k, rtol=0, atol=0)  # new column written, nothing else
    torch.testing.assert_close(values, want_v, rtol=0, atol=0)


def test_never_reads_padding_or_unfilled_columns():
    q, k_new, v_new, keys, values = _case(2, 2, 2, 128, 16, torch.float32, seed=1)
    start, slot = torch.tensor([5, 60], device=DEV), torch.tensor([100], device=DEV)
    clean = triton_attention.fused_decode_attention(q, k_new, v_new, keys.clone(), values.clone(), start, slot, 0.25)
    for row, s0 in enumerate((5, 60)):  # garbage where the row has no real token
        keys[row, :, :s0], values[row, :, :s0] = float("nan"), float("nan")
    keys[:, :, 101:], values[:, :, 101:] = float("nan"), float("nan")
    dirty = triton_attention.fused_decode_attention(q, k_new, v_new, keys, values, start, slot, 0.25)
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_half_precision_close_to_fp32_reference():
    q, k_new, v_new, keys, values = _case(4, 2, 4, 200, 64, DTYPE, seed=2)
    start, slot = torch.tensor([0, 10, 64, 120], device=DEV), torch.tensor([190], device=DEV)
    want, _, _ = _reference(q, k_new, v_new, keys, values, start, slot, 0.125)
    got = triton_attention.fused_decode_attention(q, k_new, v_new, keys, values, start, slot, 0.125)
    assert got.dtype == DTYPE
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)
