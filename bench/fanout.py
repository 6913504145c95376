"""Fan-out of independent items over Dask workers: one worker, then one worker per ``--workers`` entry.

Workload: activation capture of ``--n`` transcripts (200-700 random tokens, the first 100 the
prompt) at every layer for each of ``--checkpoints`` checkpoints of one shape, the work of a
checkpoint trajectory. Each worker process builds the shape once (random weights) and, per
item, draws the checkpoint's weights in place (seed = checkpoint index, what loading a
checkpoint into a resident model costs on the device) and captures; the item returns the
per-layer mean of the response means, so the results of every layout can be compared.

A worker entry is a CUDA device index (the worker sees only that GPU through
``CUDA_VISIBLE_DEVICES``) or ``cpu``: ``0,1`` is one worker per GPU, ``0,0`` two workers
sharing GPU 0, ``0,cpu`` a GPU worker and a CPU worker. Each layout first warms its workers
(model, kernels) and then times the items. Reported: wall time, each worker's busy seconds,
each GPU's busy fraction over the wall time (NVML utilisation sampled every 50 ms), the
speedup of the last layout over the first (one worker on the first entry).

    python -m bench.fanout --device cuda --model-shape olmo2-7b --workers 0,1
"""

from __future__ import annotations

import os
import threading
import time

import torch

from bench.common import SHAPES, build_model, emit, environment, parse_args, random_tokens

PROMPT_TOKENS = 100
_RESIDENT: dict[str, object] = {}  # per worker process: the built model


def _redraw(model: torch.nn.Module, checkpoint: int) -> None:
    """The checkpoint's weights, drawn in place on the model's device."""
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(1000 + checkpoint)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=g)


def capture_checkpoint(shape: str, checkpoint: int, n: int, seed: int, token_budget: int) -> dict:
    """One item on a worker: the checkpoint's capture; returns its figures and ``[L+1, H]`` means."""
    from persona_ops.interp.capture import capture_tokens

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if shape not in _RESIDENT:
        _RESIDENT[shape] = build_model(shape, device)
    loaded = _RESIDENT[shape]
    vocab = loaded.model.config.get_text_config().vocab_size
    seqs = random_tokens(n, 200, 700, vocab, seed + checkpoint)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _redraw(loaded.model, checkpoint)
    res = capture_tokens(loaded, [s[:PROMPT_TOKENS] for s in seqs], [s[PROMPT_TOKENS:] for s in seqs],
                         aggregates=("response_avg",), token_budget=token_budget, progress=False)
    busy = time.perf_counter() - t0
    return {"checkpoint": checkpoint, "worker_pid": os.getpid(), "device": device,
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "busy_s": busy,
            "tokens": sum(len(s) - PROMPT_TOKENS for s in seqs),
            "means": res.means["response_avg"].mean(dim=0)}


class GpuSampler:
    """NVML utilisation of the given GPUs, sampled every ``period`` seconds on a thread."""

    def __init__(self, gpus: list[int], period: float = 0.05):
        import pynvml

        pynvml.nvmlInit()
        self._nvml, self._period = pynvml, period
        self._handles = {g: pynvml.nvmlDeviceGetHandleByIndex(g) for g in gpus}
        self.samples: dict[int, list[int]] = {g: [] for g in gpus}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            for g, h in self._handles.items():
                self.samples[g].append(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu)

    def __enter__(self) -> "GpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def busy(self) -> dict[str, float]:
        return {str(g): round(sum(s) / (100 * len(s)), 3) if s else None for g, s in self.samples.items()}


def run_layout(entries: list[str], args) -> dict:
    """Start one Dask worker per entry, warm them, time the items; returns the layout's figures."""
    from distributed import Client, Nanny, Scheduler, SpecCluster

    from bench.fanout import capture_checkpoint as item  # by reference: workers import it (and keep _RESIDENT)

    cpu_threads = max(1, (os.cpu_count() or 2) // len(entries))

    def env(entry: str) -> dict:
        common = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "OMP_NUM_THREADS": str(cpu_threads),
                  "TOKENIZERS_PARALLELISM": "false", "DASK_LOGGING__DISTRIBUTED": "warning",
                  "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
        return {**common, "CUDA_VISIBLE_DEVICES": "" if entry == "cpu" else entry}

    workers = {f"w{i}-{e}": {"cls": Nanny, "options": {"nthreads": 1, "env": env(e), "memory_limit": 0}}
               for i, e in enumerate(entries)}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    gpus = sorted({int(e) for e in entries if e != "cpu"})
    with SpecCluster(workers=workers, scheduler=scheduler, asynchronous=False, silence_logs=40) as cluster, \
            Client(cluster) as client:
        t0 = time.perf_counter()
        warm = [client.submit(item, args.model_shape, -1, 8, args.seed, args.token_budget,
                              pure=False, workers=[name]) for name in workers]
        client.gather(warm)
        warm_s = time.perf_counter() - t0
        sampler = GpuSampler(gpus) if gpus and args.device == "cuda" else None
        with sampler or _Null():
            t0 = time.perf_counter()
            futures = client.map(item, [args.model_shape] * args.checkpoints, range(args.checkpoints),
                                 [args.n] * args.checkpoints, [args.seed] * args.checkpoints,
                                 [args.token_budget] * args.checkpoints, pure=False)
            items = client.gather(futures)
            wall = time.perf_counter() - t0
    per_worker: dict[str, dict] = {}
    for it in items:
        w = per_worker.setdefault(str(it["worker_pid"]), {"gpu": it["gpu"] or "cpu", "items": 0, "busy_s": 0.0})
        w["items"] += 1
        w["busy_s"] = round(w["busy_s"] + it["busy_s"], 2)
    tokens = sum(it["tokens"] for it in items)
    return {"workers": entries, "warm_up_s": round(warm_s, 1), "wall_s": round(wall, 2),
            "response_tokens_per_s": round(tokens / wall), "per_worker": list(per_worker.values()),
            "gpu_busy_fraction": sampler.busy() if sampler else {},
            "_means": {it["checkpoint"]: it["means"] for it in items}}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def main() -> None:
    def extra(ap):
        ap.add_argument("--workers", default="0,1",
                        help="comma-separated worker entries: a CUDA device index or 'cpu' (default 0,1)")
        ap.add_argument("--checkpoints", type=int, default=8, help="items: checkpoints to capture (default 8)")
        ap.add_argument("--n", type=int, default=None, help="transcripts per checkpoint (default 256 cuda, 8 cpu)")
        ap.add_argument("--token-budget", type=int, default=16384, help="capture token budget per batch")

    args = parse_args(__doc__.splitlines()[0], extra)
    if args.model_shape not in SHAPES:
        raise SystemExit(f"--model-shape: expected one of {sorted(SHAPES)}")
    args.n = args.n or (256 if args.device == "cuda" else 8)
    entries = [e.strip() for e in args.workers.split(",") if e.strip()]
    if args.device == "cpu":
        entries = ["cpu"] * len(entries)
    print(f"shape={args.model_shape} checkpoints={args.checkpoints} n={args.n} layouts={entries[:1]} then {entries}",
          flush=True)
    one = run_layout(entries[:1], args)
    print({k: v for k, v in one.items() if k != "_means"}, flush=True)
    many = run_layout(entries, args)
    print({k: v for k, v in many.items() if k != "_means"}, flush=True)
    # the same checkpoints give the same means whichever worker captured them
    diff = max(float((one["_means"][c] - many["_means"][c]).abs().max()) for c in one["_means"])
    emit({"bench": "fanout", "device": args.device, "model_shape": args.model_shape, "checkpoints": args.checkpoints,
          "transcripts_per_checkpoint": args.n, "one_worker": {k: v for k, v in one.items() if k != "_means"},
          "fan_out": {k: v for k, v in many.items() if k != "_means"},
          "speedup": round(one["wall_s"] / many["wall_s"], 2), "max_abs_diff_of_means": diff,
          "runner": "dask.distributed SpecCluster of Nannies, one thread each", "env": environment(args.device)})


if __name__ == "__main__":
    main()
