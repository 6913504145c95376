"""Shared benchmark helpers: model shapes built from configs, workloads, timing, JSON output.

Random-weight models of real architectures are built in memory (no downloads), weights
drawn N(0, 0.02) so bf16 activations stay finite. ``embedded`` is the real SmolLM2-135M on
CPU (``load_model("embedded")``) and its config with random weights on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from persona_ops.models.loading import LoadedModel

# cuBLAS is bitwise reproducible across streams (CUDA graph capture uses its own) only with a
# fixed workspace; must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

SHAPES: dict[str, tuple[str, dict]] = {
    "olmo2-7b": ("olmo2", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                               num_attention_heads=32, num_key_value_heads=32, vocab_size=100352,
                               rms_norm_eps=1e-6, max_position_embeddings=4096)),
    "qwen3-4b": ("qwen3", dict(num_hidden_layers=36, hidden_size=2560, intermediate_size=9728,
                               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                               vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960)),
    "tiny": ("llama", dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=4096)),  # next to no compute: host overheads
    "embedded": ("llama", dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                               num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                               tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=8192,
                               rope_theta=100000.0)),
}


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model-shape", default="embedded", choices=tuple(SHAPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    if extra:
        extra(ap)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def build_model(shape: str, device: str) -> LoadedModel:
    """The benchmark model: real SmolLM2 for ``embedded`` on CPU, else random weights (bf16 on GPU)."""
    if shape == "embedded" and device == "cpu":
        from persona_ops.models.loading import load_model

        return load_model("embedded", device="cpu", dtype="float32")
    arch, kw = SHAPES[shape]
    cfg = AutoConfig.for_model(arch, initializer_range=0.02, **kw)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    with torch.no_grad():  # explicit small init, whatever the library's defaults are
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return LoadedModel(model=model, tokenizer=None, label=f"random-{shape}")


def random_tokens(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` sequences of random ids with lengths uniform in ``[lo, hi]`` (avoiding id 0-3)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(4, vocab, (L,), generator=g).tolist() for L in lengths]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[float, object]:
    """Wall seconds of ``fn()`` with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def median_time(fn: Callable[[], object], device: str, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t, out = timed(fn, device)
        times.append(t)
    return statistics.median(times), out


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    """Peak GPU memory allocated since :func:`reset_peak` (GiB); on CPU the process' max RSS."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)


def environment(device: str) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "host_cpu": platform.processor() or platform.machine(),
           "threads": torch.get_num_threads()}
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def profile_call(fn) -> None:
    """Print the CUDA kernels of one call, by total device time (CUDA graph replays included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"profile: device time {total:.1f} ms over {sum(e.count for e in events if e.self_device_time_total)} "
          "kernel/memcpy events", flush=True)
    print(events.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=70), flush=True)


def emit(figures: dict) -> None:
    """Print the figures as the last line of output (one JSON object)."""
    print(json.dumps(figures, sort_keys=False), flush=True)
