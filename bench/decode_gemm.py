"""Decode GEMMs: how close cuBLAS gets to the copy bandwidth at a decode step's few rows.

For each weight of one decoder block of ``--model-shape`` (and the LM head), ``F.linear`` of
``--batch`` rows, as a decode step runs it, timed from CUDA-graph replays over enough copies of
the weight that none is still in L2; also the packed variants (q/k/v as one matrix, gate/up as
one). Reported per shape: weight bytes, microseconds, TB/s and the fraction of the device-to-device
copy bandwidth measured in the same run; and for the whole step (every block's weights plus the
LM head) the time the weights alone take at these rates, as a fraction of the time the copy
bandwidth would take: the ceiling a decode step built on these GEMMs can reach.

    python -m bench.decode_gemm --device cuda --model-shape olmo2-7b
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from bench.common import SHAPES, emit, environment, parse_args
from bench.limits import copy_bandwidth

L2_BYTES = 256 << 20  # rotate over at least this many bytes of weights (H100/H200 L2: 50-60 MB)


def linear_seconds(rows: int, out_features: int, in_features: int, reps: int = 10) -> float:
    """Seconds of one ``F.linear`` of ``rows`` bf16 rows through a weight not in L2."""
    nbytes = out_features * in_features * 2
    copies = max(2, -(-L2_BYTES // nbytes))
    weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
               for _ in range(copies)]
    x = torch.randn(rows, in_features, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for w in weights:
            F.linear(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in weights:
            F.linear(x, w)
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (reps * copies)


def main() -> None:
    def extra(ap):
        ap.add_argument("--batch", type=int, default=40, help="rows of the decode step (default 40)")

    args = parse_args(__doc__.splitlines()[0], extra)
    if args.device != "cuda":
        raise SystemExit("bench.decode_gemm measures GPU GEMMs: --device cuda")
    _, cfg = SHAPES[args.model_shape]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * head, cfg["num_key_value_heads"] * head
    block = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q), "gate": (inter, h), "up": (inter, h),
             "down": (h, inter)}
    packed = {"qkv": (q + 2 * kv, h), "gate_up": (2 * inter, h)}
    lm_head = (cfg["vocab_size"], h)
    bandwidth = copy_bandwidth("cuda")
    rows = []
    for name, (n, k) in {**block, **packed, "lm_head": lm_head}.items():
        s = linear_seconds(args.batch, n, k)
        nbytes = n * k * 2
        rows.append({"weight": name, "shape": [n, k], "mbytes": round(nbytes / 1e6, 1), "us": round(s * 1e6, 2),
                     "tb_s": round(nbytes / s / 1e12, 3), "fraction_of_copy": round(nbytes / s / bandwidth, 3)})
        print(rows[-1], flush=True)
    by = {r["weight"]: r for r in rows}

    def step(names: list[str]) -> dict:
        nbytes = cfg["num_hidden_layers"] * sum(by[n]["mbytes"] for n in names) + by["lm_head"]["mbytes"]
        us = cfg["num_hidden_layers"] * sum(by[n]["us"] for n in names) + by["lm_head"]["us"]
        return {"weights_gb": round(nbytes / 1e3, 2), "ms": round(us / 1e3, 3),
                "fraction_of_copy": round(nbytes * 1e6 / (us * 1e-6) / bandwidth, 3)}

    emit({"bench": "decode_gemm", "device": "cuda", "model_shape": args.model_shape, "batch": args.batch,
          "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3), "gemms": rows,
          "step_separate": step(list(block)), "step_packed": step(["qkv", "o", "gate_up", "down"]),
          "env": environment("cuda")})


if __name__ == "__main__":
    main()
