"""CPU linear layers: MKL's ``F.linear`` vs oneDNN on prepacked weights (persona_ops.kernels.cpu_linear).

Workload: the linear shapes of the chosen model (q/k/v/o, gate/up/down, LM head) at the row
counts of decoding (1, 20, 40 rows) and capture (450 rows); GFLOP/s per shape and the
FLOP-weighted speedup of a whole forward's linears per row count; ``speedup_vs_reference`` is
the geometric mean of those over the row counts. CPU only.

    python -m bench.cpu_linear --model-shape embedded
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from bench.common import SHAPES, emit, environment, parse_args


def linear_shapes(shape: str) -> dict[str, tuple[int, int, int]]:
    """``name -> (in_features, out_features, count per forward)`` of a model shape."""
    _, c = SHAPES[shape]
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {"q_proj": (h, q, layers), "k_proj/v_proj": (h, kv, 2 * layers), "o_proj": (q, h, layers),
            "gate/up_proj": (h, inter, 2 * layers), "down_proj": (inter, h, layers),
            "lm_head": (h, c["vocab_size"], 1)}


def seconds_per_call(fn, min_seconds: float = 0.3) -> float:
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - t0) / calls


@torch.inference_mode()
def main() -> None:
    def extra(ap):
        ap.add_argument("--rows", default="1,20,40,450", help="comma-separated row counts")
        ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")

    args = parse_args(__doc__.splitlines()[0], extra)
    dtype = getattr(torch, args.dtype)
    shapes = linear_shapes(args.model_shape)
    per_shape, per_rows = [], {}
    for m in (int(r) for r in args.rows.split(",")):
        t_ref = t_packed = flops = 0.0
        for name, (k, n, count) in shapes.items():
            x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype) * k ** -0.5
            packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
            ref = seconds_per_call(lambda: F.linear(x, w))
            fast = seconds_per_call(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            f = 2 * m * k * n
            err = float((torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "").float()
                         - F.linear(x, w).float()).abs().max())
            per_shape.append({"rows": m, "linear": name, "in": k, "out": n, "mkl_gflops": round(f / ref / 1e9, 1),
                              "packed_gflops": round(f / fast / 1e9, 1), "speedup": round(ref / fast, 2),
                              "max_abs_diff": float(f"{err:.1e}")})
            print(per_shape[-1], flush=True)
            t_ref, t_packed, flops = t_ref + count * ref, t_packed + count * fast, flops + count * f
        per_rows[m] = {"mkl_gflops": round(flops / t_ref / 1e9, 1), "packed_gflops": round(flops / t_packed / 1e9, 1),
                       "speedup": round(t_ref / t_packed, 2)}
        print(f"rows={m}: all linears of one forward {per_rows[m]}", flush=True)
    emit({"bench": "cpu_linear", "device": "cpu", "model_shape": args.model_shape, "dtype": args.dtype,
          "speedup_vs_reference": round(statistics.geometric_mean(r["speedup"] for r in per_rows.values()), 2),
          "per_rows": per_rows, "per_shape": per_shape, "env": environment("cpu")})


if __name__ == "__main__":
    main()
