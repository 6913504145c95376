"""Activation capture: the engine vs persona_vectors' per-sample, all-hidden-states reference.

Workload: ``--n`` sequences of 200-700 random tokens, the first 100 the prompt, means over
the rest. Reference: one sample at a time, ``model(..., output_hidden_states=True)`` (LM head
included), per layer ``prompt_avg``/``response_avg``/``prompt_last`` copied to the host, as
generate_vec.py does (under ``no_grad``, which favours the reference). Engine: middle layer
only, and all layers, over token budgets, eager and with compiled blocks; the best is the
headline. On the CPU the engine caps batches at ``CPU_TOKEN_BUDGET`` tokens, so the default
sweep stops there. Each setting gets one untimed pass; times are medians over rounds that
interleave the reference and the engine. On CUDA each setting's matrix-product FLOP rate
(:func:`bench.limits.forward_flops`) is also a fraction of the bf16 GEMM rate measured in the run.

    python -m bench.capture --device cuda --model-shape olmo2-7b
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from bench.common import (build_model, emit, environment, parse_args, peak_gib, profile_call, random_tokens,
                          reset_peak, timed)
from bench.limits import forward_flops, gemm_rate
from persona_ops.interp import capture as capture_module
from persona_ops.interp.capture import AGGREGATES, CPU_TOKEN_BUDGET, capture_tokens
from persona_ops.kernels import cpu_linear

PROMPT_TOKENS = 100


@torch.no_grad()
def reference_capture(loaded, seqs: list[list[int]]) -> torch.Tensor:
    """persona_vectors' extraction; returns ``response_avg`` ``[n, L+1, H]`` for the accuracy check."""
    dev = loaded.device
    out = []
    for s in seqs:
        hs = loaded.model(torch.tensor([s], device=dev), output_hidden_states=True).hidden_states
        p = PROMPT_TOKENS
        rows = []
        for h in hs:
            _prompt_avg = h[:, :p].mean(dim=1).detach().cpu()
            response_avg = h[:, p:].mean(dim=1).detach().cpu()
            _prompt_last = h[:, p - 1].detach().cpu()
            rows.append(response_avg[0])
        out.append(torch.stack(rows))
    return torch.stack(out).float()


def main() -> None:
    def extra(ap):
        ap.add_argument("--n", type=int, default=None, help="sequences (default 128 on cuda, 24 on cpu)")
        ap.add_argument("--budgets", default=None, help="comma-separated token budgets to sweep")
        ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 4 cuda, 3 cpu)")
        ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="also time compile_blocks=True (auto: on cuda)")
        ap.add_argument("--ref-rounds", type=int, default=3,
                        help="rounds that also time the reference (it is host-bound and varies; median)")
        ap.add_argument("--profile", action="store_true", help="print a kernel profile of the best middle-layer call")

    args = parse_args(__doc__.splitlines()[0], extra)
    dev = args.device
    n = args.n or (128 if dev == "cuda" else 24)
    default_budgets = "8192,16384" if dev == "cuda" else f"{CPU_TOKEN_BUDGET // 2},{CPU_TOKEN_BUDGET}"
    budgets = [int(b) for b in (args.budgets or default_budgets).split(",")]
    rounds = args.rounds or (4 if dev == "cuda" else 3)
    loaded = build_model(args.model_shape, dev)
    vocab = loaded.model.config.get_text_config().vocab_size
    seqs = random_tokens(n, 200, 700, vocab, args.seed)
    prompts, answers = [s[:PROMPT_TOKENS] for s in seqs], [s[PROMPT_TOKENS:] for s in seqs]
    tokens = sum(len(s) for s in seqs)
    mid = loaded.num_layers // 2
    layer_sets = {"middle": [mid], "all": None}
    print(f"shape={args.model_shape} device={dev} n={n} tokens={tokens} layers={loaded.num_layers} mid={mid} "
          f"threads={torch.get_num_threads()}" + (f" cpu_token_budget={CPU_TOKEN_BUDGET}" if dev == "cpu" else ""), flush=True)

    # warm-up (kernels, allocator) for both paths
    reference_capture(loaded, seqs[:2])
    capture_tokens(loaded, prompts[:8], answers[:8], layers=[mid], progress=False)

    ref_times, times, peaks, errs = [], {}, {}, {}
    ref_peak, ref = 0.0, None
    # (layers, token budget, compiled blocks, packed CPU linears); on CPU one ablation with
    # MKL's F.linear (packed=False) shows what the oneDNN kernels contribute
    shipped = capture_module.PACK_LINEARS
    configs = [(name, budget, False, shipped) for budget in budgets for name in layer_sets]
    if args.compile == "on" or (args.compile == "auto" and dev == "cuda"):
        configs += [(name, budget, True, shipped) for budget in budgets for name in layer_sets]
    if dev == "cpu" and cpu_linear.available():
        configs.append(("middle", budgets[0], False, not shipped))

    def run_engine(name: str, budget: int, compiled: bool, packed: bool):
        capture_module.PACK_LINEARS = packed
        return timed(lambda: capture_tokens(loaded, prompts, answers, layers=layer_sets[name], aggregates=AGGREGATES,
                                            token_budget=budget, progress=False, compile_blocks=compiled), dev)

    compile_info = {}
    for cfg in list(configs):  # one untimed pass each: allocator, cuBLAS heuristics, compilation
        try:
            t0, _ = run_engine(*cfg)
            if cfg[2]:
                compile_info.setdefault(cfg[0], {"first_pass_seconds": round(t0, 1)})
        except Exception as e:  # a failed compile is reported; the eager figures stand
            compile_info[cfg[0]] = {"error": f"{type(e).__name__}: {e}"[:300]}
            configs.remove(cfg)
            print("failed:", cfg, compile_info[cfg[0]], flush=True)

    # rounds: the reference and every engine setting once per round (interleaved, so a noisy
    # shared CPU affects all alike); medians over rounds.
    for rnd in range(rounds):
        if rnd < args.ref_rounds:
            reset_peak(dev)
            t_ref, ref = timed(lambda: reference_capture(loaded, seqs), dev)
            ref_peak = max(ref_peak, peak_gib(dev))
            ref_times.append(t_ref)
            print(f"round {rnd} reference per-sample all layers: {t_ref:.2f}s {tokens / t_ref:.0f} tok/s", flush=True)
        for key in configs:
            reset_peak(dev)
            t, res = run_engine(*key)
            times.setdefault(key, []).append(t)
            peaks[key] = max(peaks.get(key, 0.0), peak_gib(dev))
            idx = res.layers.index(mid)
            err = (res.means["response_avg"][:, idx] - ref[:, mid]).norm() / ref[:, mid].norm()
            errs[key] = max(errs.get(key, 0.0), float(err))
            print(f"round {rnd} engine {key[0]} budget {key[1]} compiled {key[2]} packed {key[3]}: {t:.2f}s {tokens / t:.0f} tok/s",
                  flush=True)

    t_ref = statistics.median(ref_times)
    ref_tps = tokens / t_ref
    sweep = [{"layers": k[0], "token_budget": k[1], "compiled": k[2], "packed_linears": k[3],
              "seconds": round(statistics.median(v), 3),
              "tokens_per_s": round(tokens / statistics.median(v)), "peak_gib": peaks[k],
              "rel_err_vs_reference": float(f"{errs[k]:.2e}")} for k, v in times.items()]
    for row in sweep:
        print(row, flush=True)

    capture_module.PACK_LINEARS = shipped
    with tempfile.TemporaryDirectory() as tmp:  # per-token rows streamed to disk
        budget = budgets[-1]
        reset_peak(dev)
        t_none, res = timed(lambda: capture_tokens(loaded, prompts, answers, layers=[mid], aggregates=("none",),
                                                   token_budget=budget, shard_dir=tmp, progress=False), dev)
        none_row = {"tokens_per_s": round(tokens / t_none), "token_budget": budget, "shards": len(res.shards),
                    "peak_gib": peak_gib(dev)}
        print({"none": none_row}, flush=True)

    gemm = gemm_rate(dev)  # on CUDA: each setting's FLOP rate as a fraction of the GEMM rate measured now
    lengths = [len(x) for x in seqs]
    for row in sweep:
        flops = forward_flops(loaded, lengths, mid if row["layers"] == "middle" else None)
        row["fraction_of_gemm_rate"] = round(flops / row["seconds"] / gemm, 3) if dev == "cuda" else None

    engine_rows = [r for r in sweep if r["packed_linears"] == shipped]  # the engine as shipped; the rest is ablation
    best = {k: max((r for r in engine_rows if r["layers"] == k), key=lambda r: r["tokens_per_s"]) for k in layer_sets}
    eager = {k: max((r for r in engine_rows if r["layers"] == k and not r["compiled"]), key=lambda r: r["tokens_per_s"])
             for k in layer_sets}
    if args.profile and dev == "cuda":
        b = best["middle"]
        profile_call(lambda: run_engine("middle", b["token_budget"], b["compiled"], shipped))
    middle = [r for r in sweep if r["layers"] == "middle" and not r["compiled"]]
    mkl = [r for r in middle if not r["packed_linears"]]
    onednn = [r for r in middle if r["packed_linears"]]
    emit({
        "bench": "capture", "device": dev, "model_shape": args.model_shape, "n_sequences": n, "tokens": tokens,
        "middle_layer": mid, "reference_tokens_per_s": round(ref_tps), "reference_peak_gib": ref_peak,
        "reference_first_pass_tokens_per_s": round(tokens / ref_times[0]),
        "reference_seconds": [round(x, 3) for x in ref_times],
        "middle_tokens_per_s": best["middle"]["tokens_per_s"], "middle_token_budget": best["middle"]["token_budget"],
        "middle_compiled": best["middle"]["compiled"], "middle_peak_gib": best["middle"]["peak_gib"],
        "all_layers_tokens_per_s": best["all"]["tokens_per_s"], "all_layers_token_budget": best["all"]["token_budget"],
        "all_layers_compiled": best["all"]["compiled"], "all_layers_peak_gib": best["all"]["peak_gib"],
        "gemm_tflop_s": round(gemm / 1e12, 1) if dev == "cuda" else None,
        "middle_fraction_of_gemm_rate": best["middle"]["fraction_of_gemm_rate"],
        "all_layers_fraction_of_gemm_rate": best["all"]["fraction_of_gemm_rate"],
        "speedup_vs_reference": round(best["middle"]["tokens_per_s"] / ref_tps, 2),
        "speedup_all_layers_vs_reference": round(best["all"]["tokens_per_s"] / ref_tps, 2),
        "speedup_eager_vs_reference": round(eager["middle"]["tokens_per_s"] / ref_tps, 2),
        "speedup_eager_all_layers_vs_reference": round(eager["all"]["tokens_per_s"] / ref_tps, 2),
        "compile": compile_info, "none_aggregate": none_row,
        "packed_linears": shipped,
        "speedup_mkl_linears_vs_reference": round(max(r["tokens_per_s"] for r in mkl) / ref_tps, 2) if mkl else None,
        "speedup_packed_linears_vs_reference": (round(max(r["tokens_per_s"] for r in onednn) / ref_tps, 2)
                                                if onednn else None),
        "max_rel_err_vs_reference": max(r["rel_err_vs_reference"] for r in sweep),
        "sweep": sweep, "env": environment(dev),
    })


if __name__ == "__main__":
    main()
