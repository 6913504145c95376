"""LoRA SFT throughput: the project's packed trainer vs TRL's SFTTrainer with its default padding.

Model: Qwen3-4B's shape with random weights, N(0, 0.02), built from the config below (bf16, SDPA).
LoRA r 32 / alpha 64 / rsLoRA on q, k, v, o, gate, up, down; persona_vectors' batch 2 x accumulation 8
(16 conversations a step), lr 1e-5, AdamW. Data: synthetic tokenised chats of 200-700 tokens, a
prompt of 30-160 (system and user turns up to the generation prompt, no loss) and the trained
response. Every run trains the same conversations in the same order for the same steps, through
:func:`persona_ops.training.sft.train_tokenized`:

- ``reference``: ``packing=False``, i.e. TRL's ``SFTTrainer`` with its default collator, which pads
  each micro-batch of 2 to its longest and passes an attention mask (SDPA with that mask).
- ``packed``: the default: each step's 16 conversations in rows of as many as the default token
  budget (8192) allows, here 8, no padding, PyTorch's flash-attention varlen kernel.
- ``packed-rows-of-2``: packing with the reference's micro-batches (what packing alone gives).
- ``packed-16k``: ``packed_tokens=16384``, so one row a step.
- ``padded-batch-8``: TRL's padding with micro-batches of 8 x accumulation 2 (same steps): what larger
  micro-batches give without packing.
- ``qlora``: ``packed`` on the same weights quantised to NF4 by bitsandbytes (``load_model(four_bit=True)``,
  the backdoor sweep's ``training.qlora``): its memory and speed; its losses differ by the quantisation.

Timing: wall time between CUDA-synchronised ends of optimizer steps; the first ``--warmup`` steps are
excluded, and one more step after the timed ones runs under torch.profiler (GPU ops launched and
their summed GPU time, which shows how much of a step the GPU is busy). Tokens are counted on each
forward (a counting hook): real tokens, and padded ones. The loss of every step is compared with
the reference's (bf16, so equal to about 1e-3).
FLOPs, counted the same way for every run, on real tokens only (padding and masked attention count
nothing): frozen base linears 4·N·T (forward 2·N·T, input gradients 2·N·T; N = weights of the
decoder's linears), LoRA 6·N_lora·T (N_lora = r·(in + out) per adapted linear: forward, input and
weight gradients), LM head 4·V·H per trained target (TRL scores only those), causal attention
6·heads·head_dim·L² per conversation of L tokens and layer (2·h·d·L² forward, twice that backward).
The bf16 GEMM rate is an 8192³ matmul in the same process (mean of 10 after 3 warm-ups).

    python -m bench.train_lora --device cuda
"""

from __future__ import annotations

import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

from bench.common import emit, environment, parse_args, peak_gib, reset_peak, sync
from persona_ops.models.loading import LoadedModel, load_model
from persona_ops.training.sft import IGNORE, LoraConfigSpec, TrainConfig, train_tokenized

QWEN3_4B = {"hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0}, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 40960}
STEP_CONVERSATIONS = 16  # batch 2 x accumulation 8


def build_model(device: str, layers: int, vocab: int) -> LoadedModel:
    """Qwen3-4B's shape, random N(0, 0.02) weights; ``layers``/``vocab`` shrink it for a CPU check."""
    cfg = AutoConfig.for_model("qwen3", initializer_range=0.02,
                               **{**QWEN3_4B, "num_hidden_layers": layers, "vocab_size": vocab})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    return LoadedModel(model=model.eval(), tokenizer=pad_only_tokenizer(), label="random-qwen3-4b")


def pad_only_tokenizer():
    """The trainer needs a tokenizer only for its pad token (the data is tokenised)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer(models.WordLevel({"<pad>": 0, "<unk>": 1}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=vocab, pad_token="<pad>", unk_token="<unk>")


def four_bit_copy(loaded: LoadedModel, directory: Path) -> LoadedModel:
    """The same weights through the project's 4-bit loader (saved, then loaded quantised)."""
    loaded.model.save_pretrained(directory)
    loaded.tokenizer.save_pretrained(directory)
    return load_model(str(directory), four_bit=True)


def synthetic_chats(n: int, vocab: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)``: 200-700 tokens, the first 30-160 a prompt (no loss), the rest trained."""
    g = torch.Generator().manual_seed(seed)
    chats = []
    for _ in range(n):
        total = int(torch.randint(200, 701, (1,), generator=g))
        prompt = int(torch.randint(30, 161, (1,), generator=g))
        ids = torch.randint(4, vocab, (total,), generator=g).tolist()
        chats.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return chats


class TokenMeter:
    """A training intervention that only counts, per forward: real and padded tokens, trained targets
    and the sum of squared conversation lengths (for the attention FLOPs). Kept on the device."""

    def __init__(self):
        self.forwards: list[torch.Tensor] = []

    @contextmanager
    def __call__(self, model):
        def count(module, args, kwargs):
            ids, mask, labels = kwargs["input_ids"], kwargs.get("attention_mask"), kwargs["labels"]
            lengths = kwargs["cu_seq_lens_q"].diff() if mask is None else mask.sum(1)
            padded = torch.full((), ids.numel(), device=ids.device)
            self.forwards.append(torch.stack([x.double() for x in (
                lengths.sum(), padded, (labels[:, 1:] != IGNORE).sum(), (lengths.double() ** 2).sum())]))

        handle = model.register_forward_pre_hook(count, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def per_step(self, forwards_per_step: int) -> torch.Tensor:
        """``[steps, 4]``: real tokens, padded tokens, trained targets, sum of L² of each step."""
        rows = torch.stack(self.forwards).cpu()
        return rows.view(-1, forwards_per_step, 4).sum(1)


class StepClock(TrainerCallback):
    """Wall time at the start of training and at the end of each optimizer step (device synchronised)."""

    def __init__(self, device: str):
        self.device, self.ends = device, []

    def on_train_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.ends = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.ends.append(time.perf_counter())


class StepProfile(TrainerCallback):
    """Profiles optimizer step ``step`` (torch.profiler): the GPU work launched, kernels and copies,
    and its summed GPU time (the step itself runs slower under the profiler)."""

    def __init__(self, step: int):
        self.step, self.profiler, self.figures = step, None, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                               torch.profiler.ProfilerActivity.CUDA])
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or state.global_step != self.step:
            return
        sync("cuda")
        self.profiler.__exit__(None, None, None)
        gpu = [e for e in self.profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        self.figures = {"gpu_ops_per_step": len(gpu),
                        "gpu_s_per_step": round(sum(e.time_range.elapsed_us() for e in gpu) / 1e6, 4)}
        self.profiler = None


def launch_us(device: str, n: int = 2000) -> float:
    """Host time of one tiny in-place op (dispatch and kernel launch), microseconds."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    sync(device)
    return (time.perf_counter() - t0) / n * 1e6


def flop_counts(model: torch.nn.Module, rank: int) -> dict:
    """Weights behind the FLOP formula of the module docstring."""
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    cfg = model.config
    return {"linear": sum(m.weight.numel() for m in linears),
            "lora": sum(rank * (m.in_features + m.out_features) for m in linears),
            "lm_head": cfg.vocab_size * cfg.hidden_size,
            "attention": 6 * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers}


def step_flops(counts: dict, real: float, trained: float, squares: float) -> float:
    return (4 * counts["linear"] * real + 6 * counts["lora"] * real + 4 * counts["lm_head"] * trained
            + counts["attention"] * squares)


def gemm_tflops(device: str, n: int = 8192, repeats: int = 10) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def run(loaded: LoadedModel, chats, cfg: TrainConfig, warmup: int, timed: int, counts: dict, device: str) -> dict:
    """One training run: ``warmup`` untimed steps, ``timed`` timed ones, then one profiled (CUDA)."""
    meter, clock = TokenMeter(), StepClock(device)
    callbacks = [clock] + ([StepProfile(warmup + timed + 1)] if device == "cuda" else [])
    reset_peak(device)
    with tempfile.TemporaryDirectory() as out:
        result = train_tokenized(loaded, chats, cfg, Path(out), progress=False, interventions=meter,
                                 callbacks=callbacks)
    peak = peak_gib(device)
    steps = meter.per_step(result.extra["grad_accum"])[warmup:warmup + timed]
    seconds = [b - a for a, b in zip(clock.ends, clock.ends[1:])][warmup:warmup + timed]
    real, padded = steps.sum(0)[:2].tolist()
    total = sum(seconds)
    flops = sum(step_flops(counts, *row[[0, 2, 3]].tolist()) for row in steps)
    return {"tokens_per_s": round(real / total), "padded_tokens_per_s": round(padded / total),
            "pad_fraction": round(1 - real / padded, 4), "step_s_median": round(statistics.median(seconds), 4),
            "step_s_mean": round(total / len(seconds), 4), "peak_gib": peak, "model_tflops": flops / total / 1e12,
            "micro_batch": result.extra["micro_batch"], "grad_accum": result.extra["grad_accum"],
            "attention": result.extra["attention"], "timed_steps": len(seconds), "real_tokens": int(real),
            **(callbacks[1].figures if device == "cuda" else {}), "losses": [round(x, 6) for x in result.losses]}


def main() -> None:
    def extra(ap):
        ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
        ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
        ap.add_argument("--layers", type=int, default=QWEN3_4B["num_hidden_layers"], help="fewer for a CPU check")
        ap.add_argument("--vocab", type=int, default=QWEN3_4B["vocab_size"], help="smaller for a CPU check")
        ap.add_argument("--runs", default="reference,packed,packed-rows-of-2,packed-16k,padded-batch-8",
                        help="comma-separated; also qlora (needs bitsandbytes)")

    args = parse_args(__doc__.splitlines()[0], extra)
    dev = args.device
    loaded = build_model(dev, args.layers, args.vocab)
    steps = args.warmup + args.steps + 1  # the last one is profiled
    chats = synthetic_chats(steps * STEP_CONVERSATIONS, args.vocab, args.seed)
    base = TrainConfig(max_steps=steps, batch_size=2, grad_accum=8, learning_rate=1e-5, seed=args.seed,
                       lora=LoraConfigSpec(rank=32, alpha=64.0, rslora=True))
    configs = {"reference": base.model_copy(update={"packing": False}), "packed": base,
               "packed-rows-of-2": base.model_copy(update={"packed_tokens": 2 * 700}),
               "packed-16k": base.model_copy(update={"packed_tokens": 16384}),
               "padded-batch-8": base.model_copy(update={"packing": False, "batch_size": 8, "grad_accum": 2})}
    counts = flop_counts(loaded.model, base.lora.rank)
    gemm = gemm_tflops(dev) if dev == "cuda" else float("nan")
    launch = launch_us(dev)
    print(f"shape=qwen3-4b layers={args.layers} device={dev} conversations={len(chats)} "
          f"tokens={sum(len(i) for i, _ in chats)} steps={steps} (warm-up {args.warmup}, last profiled) "
          f"gemm={gemm:.0f} TFLOP/s, tiny op {launch:.1f} us, weights: {counts}", flush=True)

    configs["qlora"] = base
    runs = {}
    for name in args.runs.split(","):
        if name == "qlora":  # alone on the GPU: the bf16 weights wait on the host meanwhile
            with tempfile.TemporaryDirectory() as d:
                quantised = four_bit_copy(loaded, Path(d))
                loaded.model.to("cpu")
                torch.cuda.empty_cache()
                runs[name] = r = run(quantised, chats, base, args.warmup, args.steps, counts, dev)
                r["weights_gib"] = round(quantised.model.get_memory_footprint() / 2**30, 3)
                del quantised
                loaded.model.to(dev)
        else:
            runs[name] = r = run(loaded, chats, configs[name], args.warmup, args.steps, counts, dev)
            r["weights_gib"] = round(loaded.model.get_memory_footprint() / 2**30, 3)
        r["gemm_fraction"] = round(r["model_tflops"] / gemm, 4) if dev == "cuda" else None
        r["model_tflops"] = round(r["model_tflops"], 1)
        print(name, {k: v for k, v in r.items() if k != "losses"}, flush=True)
    ref = runs.get("reference")
    figures = {"bench": "train_lora", "model_shape": "qwen3-4b", "device": dev, **environment(dev),
               "layers": args.layers, "warmup_steps": args.warmup, "timed_steps": args.steps,
               "gemm_tflops": round(gemm, 1), "tiny_op_us": round(launch, 2), "runs": runs}
    for name, r in runs.items():
        figures[f"{name}_tokens_per_s"] = r["tokens_per_s"]
        figures[f"{name}_peak_gib"] = r["peak_gib"]
        if ref and name != "reference":
            figures[f"{name}_speedup_vs_reference"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
            figures[f"{name}_loss_max_abs_diff"] = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
    if ref and "packed" in runs:
        figures["speedup_vs_reference"] = figures["packed_speedup_vs_reference"]
    emit(figures)


if __name__ == "__main__":
    main()
