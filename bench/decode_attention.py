"""Decode attention: the engine's Triton kernel vs matmul attention over the whole static cache.

Workload: one layer's attention in the decode step of ``bench.generate`` (40 rows, prompts of
40-120 tokens left-padded to 120, a 256-column cache) at decode steps 0, 64 and 127, with the
model shape's heads. Engine: ``fused_decode_attention`` (cache write included, reads each row's
real columns only). Reference: the engine's matmul path (two ``index_copy_`` cache writes, then
``decode_attention`` over every column under an additive mask). GPU time per call from CUDA
graph replays (no launch overhead); TB/s counts the real keys/values a step must read.
``speedup_vs_reference`` is the geometric mean over the steps. CUDA only.

    python -m bench.decode_attention --model-shape olmo2-7b
"""

from __future__ import annotations

import math

import torch

from bench.common import SHAPES, emit, environment, parse_args
from persona_ops.inference.engine import decode_attention
from persona_ops.kernels.triton_attention import fused_decode_attention

ROWS, PROMPT, COLUMNS, STEPS = 40, 120, 256, (0, 64, 127)


def gpu_microseconds(fn, calls: int = 32, replays: int = 20) -> float:
    """Mean GPU time of ``fn()`` replayed from a CUDA graph of ``calls`` calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls)


@torch.inference_mode()
def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    if args.device != "cuda":
        raise SystemExit("bench.decode_attention needs --device cuda (the kernel is Triton)")
    _, c = SHAPES[args.model_shape]
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim", c["hidden_size"] // heads)
    group, scale = heads // kv_heads, d ** -0.5
    g = torch.Generator(device="cuda").manual_seed(args.seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    q = randn(ROWS, 1, heads, d).transpose(1, 2)  # the layouts HF hands to the attention function
    k_new, v_new = randn(ROWS, 1, kv_heads, d).transpose(1, 2), randn(ROWS, 1, kv_heads, d).transpose(1, 2)
    keys, values = randn(ROWS, kv_heads, COLUMNS, d), randn(ROWS, kv_heads, COLUMNS, d)
    start = PROMPT - torch.randint(40, PROMPT + 1, (ROWS,), device="cuda", generator=g)
    col = torch.arange(COLUMNS, device="cuda")
    print(f"shape={args.model_shape} heads={heads} kv_heads={kv_heads} head_dim={d} rows={ROWS} "
          f"columns={COLUMNS}", flush=True)
    steps, ratios = {}, []
    for step in STEPS:
        slot = torch.tensor([PROMPT + step], device="cuda")
        visible = (col[None] >= start[:, None]) & (col[None] <= slot)
        mask = torch.where(visible, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)[:, None, None, :]

        def matmul_path():
            keys.index_copy_(2, slot, k_new)
            values.index_copy_(2, slot, v_new)
            out = decode_attention(q.reshape(ROWS, kv_heads, group, d), keys, values, mask, scale)
            return out.reshape(ROWS, heads, 1, d).transpose(1, 2)

        def fused():
            return fused_decode_attention(q, k_new, v_new, keys, values, start, slot, scale)

        err = float((fused().float() - matmul_path().float()).abs().max())
        t_ref, t_fused = gpu_microseconds(matmul_path), gpu_microseconds(fused)
        real_mb = int(visible.sum()) * kv_heads * d * 2 * 2 / 1e6  # keys + values, bf16
        steps[step] = {"real_kv_mb": round(real_mb, 1), "reference_us": round(t_ref, 1), "fused_us": round(t_fused, 1),
                       "fused_tb_per_s": round(real_mb / t_fused, 2), "speedup": round(t_ref / t_fused, 2),
                       "max_abs_diff": err}
        ratios.append(t_ref / t_fused)
        print(f"step {step}: {steps[step]}", flush=True)
    emit({"bench": "decode_attention", "device": "cuda", "model_shape": args.model_shape,
          "speedup_vs_reference": round(math.exp(sum(map(math.log, ratios)) / len(ratios)), 2),
          "steps": steps, "env": environment("cuda")})


if __name__ == "__main__":
    main()
