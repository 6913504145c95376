"""Role transcripts and role-activation capture: the engine vs the assistant-axis way with HF.

Workload (defaults): 20 roles x 5 system prompts x 40 questions = 4,000 conversations of
random tokens (system prompt 20-60, question 10-40), 256 new tokens each, temperature 0.7,
top-p 0.9 (the reference's sampling). Then the mean over response tokens of every
conversation (prompt + generated answer).

- Generation reference: assistant-axis' notebook helper's HF path, ``model.generate`` on one
  conversation at a time, timed on ``--ref-conversations`` of them; its rate in new tokens/s is
  compared with the engine's over the whole workload (all rows in length-sorted batches of
  ``--batch-size``, CUDA graph decode, compiled blocks). A weak baseline, labelled as such:
  assistant-axis' pipeline generates with vLLM batch inference, which the GPU machine here
  cannot run. On CUDA the engine's time is also compared with the fastest generation at the
  copy bandwidth and GEMM rate measured in the run (:func:`bench.limits.generation_seconds`):
  ``fraction_of_bound`` (each decode step at the larger of its compute and memory times) and
  ``fraction_of_compute_bound`` (compute alone).
- Capture reference: assistant-axis' activation step, forward hooks on every decoder
  layer, right-padded batches of 16 (one role at a time), the full model forward, a mean
  over the response span per sample and layer copied to the host; timed on
  ``--ref-roles`` roles. The engine captures the middle layer (the pipeline's default)
  and all layers over the whole workload.

    python -m bench.transcripts --device cuda --model-shape olmo2-7b
"""

from __future__ import annotations

import torch

from bench.common import build_model, emit, environment, parse_args, peak_gib, random_tokens, reset_peak, timed
from bench.limits import copy_bandwidth, gemm_rate, generation_seconds
from persona_ops.inference.engine import STATS, generate_tokens
from persona_ops.inference.sampling import SamplingParams
from persona_ops.interp.capture import capture_tokens

REF_CAPTURE_BATCH = 16


@torch.no_grad()
def reference_generate(loaded, prompts: list[list[int]], sp: SamplingParams) -> int:
    """One conversation per ``generate`` call; returns the new tokens produced."""
    dev, produced = loaded.device, 0
    torch.manual_seed(sp.seed)
    for p in prompts:
        out = loaded.model.generate(input_ids=torch.tensor([p], device=dev), do_sample=True,
                                    temperature=sp.temperature, top_p=sp.top_p, top_k=None,
                                    max_new_tokens=sp.max_new_tokens, min_new_tokens=sp.max_new_tokens,
                                    pad_token_id=0)
        produced += out.shape[1] - len(p)
    return produced


@torch.no_grad()
def reference_capture(loaded, prompts: list[list[int]], answers: list[list[int]]) -> torch.Tensor:
    """Hooks on every layer, batches of 16, response means per sample on the host ``[n, L, H]``."""
    dev, layers = loaded.device, loaded.layers
    captured: dict[int, torch.Tensor] = {}

    def hook(i):
        def fn(module, args, output):
            captured[i] = output[0] if isinstance(output, tuple) else output
        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(layers)]
    out = []
    try:
        for start in range(0, len(prompts), REF_CAPTURE_BATCH):
            ps, ans = prompts[start:start + REF_CAPTURE_BATCH], answers[start:start + REF_CAPTURE_BATCH]
            seqs = [p + a for p, a in zip(ps, ans)]
            width = max(len(s) for s in seqs)
            ids = torch.zeros((len(seqs), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, s in enumerate(seqs):
                ids[r, :len(s)] = torch.tensor(s)
                mask[r, :len(s)] = 1
            loaded.model(input_ids=ids.to(dev), attention_mask=mask.to(dev))
            for r, (p, s) in enumerate(zip(ps, seqs)):
                out.append(torch.stack([captured[i][r, len(p):len(s)].mean(0).float().cpu()
                                        for i in range(len(layers))]))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(out)


def main() -> None:
    def extra(ap):
        ap.add_argument("--roles", type=int, default=20)
        ap.add_argument("--prompts", type=int, default=5, help="system prompts per role")
        ap.add_argument("--questions", type=int, default=40)
        ap.add_argument("--new-tokens", type=int, default=256)
        ap.add_argument("--batch-size", type=int, default=256, help="engine rows per generation batch")
        ap.add_argument("--ref-conversations", type=int, default=4, help="conversations the reference generates")
        ap.add_argument("--ref-roles", type=int, default=1, help="roles the capture reference processes")
        ap.add_argument("--compile", choices=("on", "off"), default="on", help="compiled decoder blocks")

    args = parse_args(__doc__.splitlines()[0], extra)
    dev = args.device
    loaded = build_model(args.model_shape, dev)
    vocab = loaded.model.config.get_text_config().vocab_size
    systems = random_tokens(args.roles * args.prompts, 20, 60, vocab, args.seed)
    questions = random_tokens(args.questions, 10, 40, vocab, args.seed + 1)
    convs = [s + q for s in systems for q in questions]  # role-major: role r owns a contiguous block
    per_role = args.prompts * args.questions
    sp = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, top_p=0.9, seed=args.seed)
    compiled = args.compile == "on"
    mid = loaded.num_layers // 2
    print(f"shape={args.model_shape} device={dev} conversations={len(convs)} new={args.new_tokens} "
          f"batch={args.batch_size} compiled={compiled}", flush=True)

    def engine(rows):
        return generate_tokens(loaded, rows, sp, min_new_tokens=args.new_tokens, eos_ids=[],
                               batch_size=args.batch_size, compile_blocks=compiled)

    # warm-up: kernels, cuBLAS heuristics, compilation (reported, not timed)
    reference_generate(loaded, convs[:1], SamplingParams(max_new_tokens=4, temperature=0.7, top_p=0.9))
    t_warm, _ = timed(lambda: engine(convs[:8]), dev)
    print(f"engine warm-up (compilation included): {t_warm:.1f}s", flush=True)

    reset_peak(dev)
    t_ref, ref_new = timed(lambda: reference_generate(loaded, convs[:args.ref_conversations], sp), dev)
    ref_gen = {"conversations": args.ref_conversations, "seconds": round(t_ref, 2),
               "new_tokens_per_s": round(ref_new / t_ref, 1), "peak_gib": peak_gib(dev)}
    print("reference generate", ref_gen, flush=True)

    reset_peak(dev)
    captures_before = STATS["graph_captures"]
    t_gen, answers = timed(lambda: engine(convs), dev)
    new = sum(len(a) for a in answers)
    gen = {"conversations": len(convs), "seconds": round(t_gen, 2), "new_tokens": new,
           "new_tokens_per_s": round(new / t_gen, 1), "peak_gib": peak_gib(dev),
           "graph_captures": STATS["graph_captures"] - captures_before}
    if dev == "cuda":  # the limits, measured now, at the engine's batch
        bandwidth, gemm = copy_bandwidth(dev), gemm_rate(dev)
        bound = generation_seconds(loaded, [len(c) for c in convs], args.new_tokens, args.batch_size, bandwidth, gemm)
        compute = bound["prefill_seconds"] + bound["decode_compute_seconds"]
        gen.update({"copy_bandwidth_tb_s": round(bandwidth / 1e12, 3), "gemm_tflop_s": round(gemm / 1e12, 1),
                    "bound_seconds": round(bound["seconds"], 2),
                    "fraction_of_bound": round(bound["seconds"] / t_gen, 3),
                    "compute_bound_seconds": round(compute, 2), "fraction_of_compute_bound": round(compute / t_gen, 3),
                    "decode_compute_seconds": round(bound["decode_compute_seconds"], 2),
                    "decode_memory_seconds": round(bound["decode_memory_seconds"], 2)})
    print("engine generate", gen, flush=True)

    tokens = sum(len(p) + len(a) for p, a in zip(convs, answers))
    n_ref = args.ref_roles * per_role
    ref_tokens = sum(len(p) + len(a) for p, a in zip(convs[:n_ref], answers[:n_ref]))
    reference_capture(loaded, convs[:REF_CAPTURE_BATCH], answers[:REF_CAPTURE_BATCH])  # warm-up
    reset_peak(dev)
    t_rc, ref_means = timed(lambda: reference_capture(loaded, convs[:n_ref], answers[:n_ref]), dev)
    ref_cap = {"conversations": n_ref, "tokens": ref_tokens, "seconds": round(t_rc, 2),
               "tokens_per_s": round(ref_tokens / t_rc), "peak_gib": peak_gib(dev)}
    print("reference capture (all layers)", ref_cap, flush=True)

    caps = {}
    for name, layers in (("middle", [mid]), ("all_layers", None)):
        capture_tokens(loaded, convs[:64], answers[:64], layers=layers, aggregates=("response_avg",),
                       progress=False, compile_blocks=compiled)  # warm-up
        reset_peak(dev)
        t, res = timed(lambda: capture_tokens(loaded, convs, answers, layers=layers, aggregates=("response_avg",),
                                              progress=False, compile_blocks=compiled), dev)
        idx = res.layers.index(mid)
        ref_mid = ref_means[:, mid - 1]  # hook on block mid-1 = hidden_states[mid]
        ours = res.means["response_avg"][:n_ref, idx]
        caps[name] = {"tokens": tokens, "seconds": round(t, 2), "tokens_per_s": round(tokens / t),
                      "peak_gib": peak_gib(dev),
                      "rel_err_vs_reference": float(f"{float((ours - ref_mid).norm() / ref_mid.norm()):.2e}")}
        print("engine capture", name, caps[name], flush=True)

    emit({
        "bench": "transcripts", "device": dev, "model_shape": args.model_shape,
        "workload": {"roles": args.roles, "prompts": args.prompts, "questions": args.questions,
                     "new_tokens": args.new_tokens},
        "reference_generate": ref_gen, "engine_generate": gen,
        "speedup_vs_reference": round(gen["new_tokens_per_s"] / ref_gen["new_tokens_per_s"], 2),
        "reference_capture": ref_cap, "engine_capture": caps,
        "capture_speedup_vs_reference": round(caps["middle"]["tokens_per_s"] / ref_cap["tokens_per_s"], 2),
        "capture_speedup_all_layers_vs_reference": round(caps["all_layers"]["tokens_per_s"] / ref_cap["tokens_per_s"], 2),
        "engine_warmup_seconds": round(t_warm, 1), "env": environment(dev),
    })


if __name__ == "__main__":
    main()
