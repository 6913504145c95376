"""Steered generation: the engine vs persona_vectors' HF ``generate`` at batch 20 with a hook.

Workload: 40 prompts of 40-120 random tokens, 128 new tokens forced (``min_new_tokens``),
temperature 1, a vector added at layer 20 (``hidden_states`` index; block 19's output).
Reference: left-padded batches of 20 through ``model.generate`` with a forward hook adding
``coef * v`` at ``t[:, -1]`` on every forward (persona_vectors' ``response`` steering).
Engine: all prompts in one batch, ``add`` at ``positions="response"``; also unsteered (the
steering cost), a coefficient-0 run (must equal unsteered token for token) and a
coefficient sweep (8 coefficients x the prompts as one batch, per-row coefficients).

    python -m bench.generate --device cuda --model-shape qwen3-4b
"""

from __future__ import annotations

import statistics

import torch

from bench.common import build_model, emit, environment, parse_args, peak_gib, random_tokens, reset_peak, timed
from persona_ops.engine import generate_tokens
from persona_ops.generation import SamplingParams
from persona_ops.interventions import Intervention

REF_BATCH = 20


@torch.no_grad()
def reference_generate(loaded, prompts: list[list[int]], vec: torch.Tensor, layer: int, coef: float,
                       new_tokens: int, seed: int) -> int:
    """HF generate in fixed batches of 20 under a last-position steering hook; returns new tokens."""
    model, dev = loaded.model, loaded.device
    v = vec.to(dev, next(model.parameters()).dtype)

    def hook(module, args, output):  # persona_vectors' ActivationSteerer, positions="response"
        h = output[0] if isinstance(output, tuple) else output
        h[:, -1] += coef * v
        return output

    handle = loaded.layers[layer - 1].register_forward_hook(hook)
    torch.manual_seed(seed)
    produced = 0
    try:
        for start in range(0, len(prompts), REF_BATCH):
            chunk = prompts[start:start + REF_BATCH]
            width = max(len(p) for p in chunk)
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, p in enumerate(chunk):
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, use_cache=True, pad_token_id=0)
            produced += (out.shape[1] - width) * len(chunk)
    finally:
        handle.remove()
    return produced


def main() -> None:
    def extra(ap):
        ap.add_argument("--n", type=int, default=40, help="prompts")
        ap.add_argument("--new-tokens", type=int, default=128)
        ap.add_argument("--layer", type=int, default=20)
        ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 3 cuda, 2 cpu)")
        ap.add_argument("--sweep", type=int, default=8, help="coefficients in the one-batch sweep (0 = skip)")

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
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=1.0, top_p=1.0, seed=args.seed)
    steer = [Intervention("add", layer, vec, coef=coef, positions="response")]
    zero = [Intervention("add", layer, vec, coef=0.0, positions="response")]
    print(f"shape={args.model_shape} device={dev} prompts={args.n} new={args.new_tokens} layer={layer}", flush=True)

    def engine(interventions, rows=None):
        return generate_tokens(loaded, rows or prompts, sp, interventions, min_new_tokens=args.new_tokens,
                               eos_ids=[], batch_size=4096)

    # warm-up: kernels, cuBLAS, allocator
    reference_generate(loaded, prompts[:REF_BATCH], vec, layer, coef, 4, args.seed)
    engine(steer)

    ref_t, eng_t, plain_t = [], [], []
    ref_peak = eng_peak = plain_peak = 0.0
    ref_tokens = args.n * args.new_tokens
    steered = unsteered = None
    for rnd in range(rounds):
        if rnd == 0 or dev == "cpu":
            reset_peak(dev)
            t, ref_tokens = timed(lambda: reference_generate(loaded, prompts, vec, layer, coef, args.new_tokens,
                                                             args.seed), dev)
            ref_peak = max(ref_peak, peak_gib(dev))
            ref_t.append(t)
            print(f"round {rnd} reference HF generate batch {REF_BATCH}: {t:.2f}s {ref_tokens / t:.0f} tok/s", flush=True)
        reset_peak(dev)
        t, steered = timed(lambda: engine(steer), dev)
        eng_peak = max(eng_peak, peak_gib(dev))
        eng_t.append(t)
        reset_peak(dev)
        t2, unsteered = timed(lambda: engine([]), dev)
        plain_peak = max(plain_peak, peak_gib(dev))
        plain_t.append(t2)
        print(f"round {rnd} engine steered {t:.2f}s unsteered {t2:.2f}s", flush=True)

    new_tokens = sum(len(r) for r in steered)
    zero_out = engine(zero)
    coef0_identical = zero_out == unsteered
    steered_differs = steered != unsteered
    ref_tps = ref_tokens / statistics.median(ref_t)
    eng_tps = new_tokens / statistics.median(eng_t)
    plain_tps = new_tokens / statistics.median(plain_t)
    figures = {
        "bench": "generate", "device": dev, "model_shape": args.model_shape, "prompts": args.n,
        "new_tokens_per_row": args.new_tokens, "layer": layer,
        "reference_new_tokens_per_s": round(ref_tps, 1), "reference_peak_gib": ref_peak,
        "steered_new_tokens_per_s": round(eng_tps, 1), "steered_peak_gib": eng_peak,
        "unsteered_new_tokens_per_s": round(plain_tps, 1), "unsteered_peak_gib": plain_peak,
        "speedup_vs_reference": round(eng_tps / ref_tps, 2),
        "steering_cost_pct": round(100 * (statistics.median(eng_t) / statistics.median(plain_t) - 1), 2),
        "coef0_identical_to_unsteered": coef0_identical, "steered_differs_from_unsteered": steered_differs,
        "seconds": {"reference": [round(x, 3) for x in ref_t], "steered": [round(x, 3) for x in eng_t],
                    "unsteered": [round(x, 3) for x in plain_t]},
    }
    if args.sweep:
        coefs = torch.linspace(-2.0, 2.0, args.sweep)
        rows = [p for _ in range(args.sweep) for p in prompts]
        per_row = coefs.repeat_interleave(len(prompts))
        sweep_iv = [Intervention("add", layer, vec, coef=per_row, positions="response")]
        reset_peak(dev)
        t, out = timed(lambda: engine(sweep_iv, rows), dev)
        figures["sweep"] = {"rows": len(rows), "coefficients": args.sweep, "seconds": round(t, 3),
                            "new_tokens_per_s": round(sum(len(r) for r in out) / t, 1), "peak_gib": peak_gib(dev)}
    figures["env"] = environment(dev)
    emit(figures)


if __name__ == "__main__":
    main()
