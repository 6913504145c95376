"""Steered generation: the engine vs persona_vectors' HF ``generate`` at batch 20 with a hook.

Workload: 40 prompts of 40-120 random tokens, 128 new tokens forced (``min_new_tokens``),
temperature 1, a vector added at layer 20 (``hidden_states`` index; block 19's output).
Reference: left-padded batches of 20 through ``model.generate`` with a forward hook adding
``coef * v`` at ``t[:, -1]`` on every forward (persona_vectors' ``response`` steering), and the
same at the engine's batch (all prompts). On CUDA a second reference: HF's own fast path,
``generate`` with ``cache_implementation="static"`` on all prompts in one batch, unsteered.
Engine: all prompts in one batch, ``add`` at ``positions="response"``; also unsteered (the
steering cost), a coefficient-0 run (must equal unsteered token for token) and a
coefficient sweep (8 coefficients x the prompts as one batch, per-row coefficients). A model
keeps one captured decode step, so each timed call follows an untimed one of the same variant
(the timed call replays its graph, as repeated calls of one shape do). On CUDA the
figures are also fractions of the decode bound (:mod:`bench.limits`) measured in the run.

    python -m bench.generate --device cuda --model-shape qwen3-4b
"""

from __future__ import annotations

import statistics

import torch

from bench.common import (build_model, emit, environment, parse_args, peak_gib, profile_call, random_tokens,
                          reset_peak, timed)
from bench.limits import copy_bandwidth, decode_bound, forward_flops, gemm_rate
from persona_ops.inference import engine as engine_module
from persona_ops.inference.engine import STATS, generate_tokens
from persona_ops.inference.sampling import SamplingParams
from persona_ops.interp.interventions import Intervention
from persona_ops.kernels import cpu_linear

REF_BATCH = 20


def cuda_graph_check() -> dict:
    """On CUDA: greedy engine output (graph, graph+compile and eager decode) vs HF generate on tiny fp32 models."""
    from persona_ops.models.loading import LoadedModel, tiny_model

    out = {}
    prompts = random_tokens(6, 3, 30, 512, 5)
    for arch in ("llama", "qwen3", "olmo2"):
        m = tiny_model(arch, num_layers=3, hidden=64).cuda()
        m.generation_config.eos_token_id = None
        lm = LoadedModel(model=m, tokenizer=None, label=arch)
        greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        with torch.no_grad():
            hf = m.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)[:, width:].tolist()
        graph = generate_tokens(lm, prompts, greedy, eos_ids=[], cuda_graph=True)
        eager = generate_tokens(lm, prompts, greedy, eos_ids=[], cuda_graph=False)
        compiled = generate_tokens(lm, prompts, greedy, eos_ids=[], cuda_graph=True, compile_blocks=True)
        out[arch] = {"graph_eq_hf": graph == hf, "eager_eq_hf": eager == hf, "graph_compiled_eq_hf": compiled == hf}
    return out


@torch.no_grad()
def reference_generate(loaded, prompts: list[list[int]], vec: torch.Tensor | None, layer: int, coef: float,
                       new_tokens: int, seed: int, batch: int = REF_BATCH, **generate_kwargs) -> int:
    """HF generate in fixed batches under a last-position steering hook (none without ``vec``);
    returns the new tokens."""
    model, dev = loaded.model, loaded.device

    def hook(module, args, output):  # persona_vectors' ActivationSteerer, positions="response"
        h = output[0] if isinstance(output, tuple) else output
        h[:, -1] += coef * v
        return output

    if vec is not None:
        v = vec.to(dev, next(model.parameters()).dtype)
        handle = loaded.layers[layer - 1].register_forward_hook(hook)
    torch.manual_seed(seed)
    produced = 0
    try:
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            width = max(len(p) for p in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, use_cache=True, pad_token_id=0, **generate_kwargs)
            produced += (out.shape[1] - width) * len(chunk)
    finally:
        if vec is not None:
            handle.remove()
    return produced


def hf_static(loaded, prompts: list[list[int]], new_tokens: int, seed: int, rounds: int) -> dict:
    """HF's fast path: ``generate`` with a static cache, all prompts in one batch, unsteered; a
    warm-up call, then the median of ``rounds`` (an error is reported, not raised)."""
    def call():
        return reference_generate(loaded, prompts, None, 1, 0.0, new_tokens, seed, batch=len(prompts),
                                  cache_implementation="static")

    try:
        warm, _ = timed(call, "cuda")
        times = [timed(call, "cuda")[0] for _ in range(rounds)]
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    tps = len(prompts) * new_tokens / statistics.median(times)
    return {"new_tokens_per_s": round(tps, 1), "seconds": [round(t, 3) for t in times],
            "warmup_seconds": round(warm, 2)}


def main() -> None:
    def extra(ap):
        ap.add_argument("--n", type=int, default=40, help="prompts")
        ap.add_argument("--new-tokens", type=int, default=128)
        ap.add_argument("--layer", type=int, default=20)
        ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3 cuda, 2 cpu)")
        ap.add_argument("--ref-rounds", type=int, default=3,
                        help="rounds that also time the reference (it is host-bound and varies; median)")
        ap.add_argument("--sweep", type=int, default=8, help="coefficients in the one-batch sweep (0 = skip)")
        ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="also time compile_blocks=True (auto: on cuda)")
        ap.add_argument("--profile", action="store_true", help="print a kernel profile of one engine call")

    args = parse_args(__doc__.splitlines()[0], extra)
    dev = args.device
    rounds = args.rounds or (3 if dev == "cuda" else 2)
    loaded = build_model(args.model_shape, dev)
    cfg = loaded.model.config.get_text_config()
    layer = min(args.layer, loaded.num_layers)
    prompts = random_tokens(args.n, 40, 120, cfg.vocab_size, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    vec = torch.randn(loaded.hidden_size, generator=g)
    vec = vec / vec.norm() * 4.0
    coef = 1.0
    steer = [Intervention("add", layer, vec, coef=coef, positions="response")]
    zero = [Intervention("add", layer, vec, coef=0.0, positions="response")]
    # variant -> (compile_blocks, packed CPU linears, Triton decode attention); the -mkl and -matmul-attn
    # variants are ablations: MKL's F.linear on CPU, matmul attention over the whole cache on CUDA
    variants = ({"cuda-graph": (False, True, True)} if dev == "cuda"
                else {"eager": (False, True, True), "eager-mkl": (False, False, True)})
    if args.compile == "on" or (args.compile == "auto" and dev == "cuda"):
        variants["cuda-graph+compile"] = (True, True, True)
        if dev == "cuda":
            variants["cuda-graph+compile-matmul-attn"] = (True, True, False)
    print(f"shape={args.model_shape} device={dev} prompts={args.n} new={args.new_tokens} layer={layer} "
          f"threads={torch.get_num_threads()} variants={list(variants)}", flush=True)

    def engine(interventions, variant, rows=None, new_tokens=args.new_tokens):
        compiled, cpu_linear.ENABLED, engine_module.FUSED_DECODE = variant
        params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, seed=args.seed)
        return generate_tokens(loaded, rows or prompts, params, interventions, min_new_tokens=new_tokens,
                               eos_ids=[], batch_size=4096, compile_blocks=compiled)

    # warm-up: kernels, cuBLAS, allocator, compilation
    reference_generate(loaded, prompts[:REF_BATCH], vec, layer, coef, 4, args.seed)
    warmup = {}
    for name, variant in variants.items():
        t, _ = timed(lambda: engine(steer, variant), dev)
        warmup[name] = round(t, 2)
        print(f"warm-up {name}: {t:.2f}s", flush=True)

    ref_t, ref_peak, ref_tokens, ref_full_t = [], 0.0, args.n * args.new_tokens, []
    res = {name: {"steered": [], "unsteered": [], "steered_peak": 0.0, "unsteered_peak": 0.0} for name in variants}
    outputs, recaptured = {}, 0
    for rnd in range(rounds):
        if rnd < args.ref_rounds:
            reset_peak(dev)
            t, ref_tokens = timed(lambda: reference_generate(loaded, prompts, vec, layer, coef, args.new_tokens,
                                                             args.seed), dev)
            ref_peak = max(ref_peak, peak_gib(dev))
            ref_t.append(t)
            print(f"round {rnd} reference HF generate batch {REF_BATCH}: {t:.2f}s {ref_tokens / t:.0f} tok/s", flush=True)
            t, _ = timed(lambda: reference_generate(loaded, prompts, vec, layer, coef, args.new_tokens, args.seed,
                                                    batch=args.n), dev)
            ref_full_t.append(t)
            print(f"round {rnd} reference HF generate batch {args.n}: {t:.2f}s {ref_tokens / t:.0f} tok/s", flush=True)
        for name, variant in variants.items():
            for kind, ivs in (("steered", steer), ("unsteered", [])):
                engine(ivs, variant)  # captures this call's graph; the timed call replays it, as repeated calls do
                captures = STATS["graph_captures"]
                reset_peak(dev)
                t, out = timed(lambda: engine(ivs, variant), dev)
                recaptured += STATS["graph_captures"] - captures
                res[name][kind].append(t)
                res[name][kind + "_peak"] = max(res[name][kind + "_peak"], peak_gib(dev))
                outputs[(name, kind, rnd)] = out
            print(f"round {rnd} engine {name}: steered {res[name]['steered'][-1]:.2f}s "
                  f"unsteered {res[name]['unsteered'][-1]:.2f}s", flush=True)

    ref_tps = ref_tokens / statistics.median(ref_t)
    new_tokens = args.n * args.new_tokens
    rows = {}
    for name, variant in variants.items():
        r = res[name]
        zero_out = engine(zero, variant)
        last = rounds - 1
        rows[name] = {
            "steered_new_tokens_per_s": round(new_tokens / statistics.median(r["steered"]), 1),
            "unsteered_new_tokens_per_s": round(new_tokens / statistics.median(r["unsteered"]), 1),
            "steered_peak_gib": r["steered_peak"], "unsteered_peak_gib": r["unsteered_peak"],
            "steering_cost_pct": round(100 * (statistics.median(r["steered"]) / statistics.median(r["unsteered"]) - 1), 2),
            "coef0_identical_to_unsteered": zero_out == outputs[(name, "unsteered", last)],
            "unsteered_repeat_identical": all(outputs[(name, "unsteered", k)] == outputs[(name, "unsteered", 0)]
                                              for k in range(rounds)),
            "steered_differs_from_unsteered": outputs[(name, "steered", last)] != outputs[(name, "unsteered", last)],
            "seconds": {k: [round(x, 3) for x in r[k]] for k in ("steered", "unsteered")},
            "warmup_seconds": warmup[name],
        }
        print(name, rows[name], flush=True)
    best = max(rows, key=lambda k: rows[k]["steered_new_tokens_per_s"])
    b = rows[best]
    limits = {}
    if dev == "cuda":  # the limits, measured now; the fastest decode of these rows at them
        bandwidth, gemm = copy_bandwidth(dev), gemm_rate(dev)
        bound = decode_bound(loaded, [len(p) for p in prompts], args.new_tokens, bandwidth, gemm)
        static = hf_static(loaded, prompts, args.new_tokens, args.seed, max(1, args.ref_rounds))
        limits = {"copy_bandwidth_tb_s": round(bandwidth / 1e12, 3), "gemm_tflop_s": round(gemm / 1e12, 1),
                  "decode_bound_new_tokens_per_s": round(bound, 1),
                  "steered_fraction_of_bound": round(b["steered_new_tokens_per_s"] / bound, 3),
                  "unsteered_fraction_of_bound": round(b["unsteered_new_tokens_per_s"] / bound, 3),
                  "hf_static_cache": static}
        # the call's parts: a call of one new token is the prefill (and one sampling); the rest are decode steps
        engine(steer, variants[best], new_tokens=1)
        prefill = statistics.median(timed(lambda: engine(steer, variants[best], new_tokens=1), dev)[0]
                                    for _ in range(3))
        call = statistics.median(b["seconds"]["steered"])
        limits["prefill"] = {"seconds": round(prefill, 4),
                             "fraction_of_gemm_rate": round(forward_flops(loaded, [len(p) for p in prompts])
                                                            / gemm / prefill, 3),
                             "decode_step_ms": round((call - prefill) / (args.new_tokens - 1) * 1e3, 3),
                             "bound_step_ms": round(len(prompts) / bound * 1e3, 3)}
        if "new_tokens_per_s" in static:
            for kind in ("steered", "unsteered"):
                limits[f"{kind}_speedup_vs_hf_static"] = round(b[f"{kind}_new_tokens_per_s"]
                                                               / static["new_tokens_per_s"], 2)
        print("limits", limits, flush=True)
    figures = {
        "bench": "generate", "device": dev, "model_shape": args.model_shape, "prompts": args.n,
        "new_tokens_per_row": args.new_tokens, "layer": layer, "variant": best,
        "reference_new_tokens_per_s": round(ref_tps, 1), "reference_peak_gib": ref_peak,
        "steered_new_tokens_per_s": b["steered_new_tokens_per_s"], "steered_peak_gib": b["steered_peak_gib"],
        "unsteered_new_tokens_per_s": b["unsteered_new_tokens_per_s"], "unsteered_peak_gib": b["unsteered_peak_gib"],
        "speedup_vs_reference": round(b["steered_new_tokens_per_s"] / ref_tps, 2),
        "steering_cost_pct": b["steering_cost_pct"],
        "coef0_identical_to_unsteered": b["coef0_identical_to_unsteered"],
        "reference_engine_batch_new_tokens_per_s": round(ref_tokens / statistics.median(ref_full_t), 1),
        "speedup_vs_reference_engine_batch": round(b["steered_new_tokens_per_s"] * statistics.median(ref_full_t)
                                                   / ref_tokens, 2),
        **limits,
        "variants": rows, "reference_seconds": [round(x, 3) for x in ref_t],
    }
    if args.sweep:
        coefs = torch.linspace(-2.0, 2.0, args.sweep)
        sweep_rows = [p for _ in range(args.sweep) for p in prompts]
        per_row = coefs.repeat_interleave(len(prompts))
        sweep_iv = [Intervention("add", layer, vec, coef=per_row, positions="response")]
        reset_peak(dev)
        t, out = timed(lambda: engine(sweep_iv, variants[best], sweep_rows), dev)
        tps = sum(len(r) for r in out) / t
        figures["sweep"] = {"rows": len(sweep_rows), "coefficients": args.sweep, "seconds": round(t, 3),
                            "new_tokens_per_s": round(tps, 1), "speedup_vs_reference": round(tps / ref_tps, 2),
                            "peak_gib": peak_gib(dev)}
    if args.profile and dev == "cuda":
        profile_call(lambda: engine(steer, variants[best]))
    if dev == "cuda":
        figures["greedy_check"] = cuda_graph_check()
    figures["engine_stats"] = dict(STATS, timed_calls_that_captured=recaptured)
    figures["env"] = environment(dev)
    emit(figures)


if __name__ == "__main__":
    main()
