"""Serving: concurrent steered chat requests through ``serve-model``'s app vs the same requests one at a time.

Workload: ``--requests`` chat requests (default 64), each a user message of 40-120 random tokens,
``--new-tokens`` new tokens (the random model has no end-of-sequence token, so every row runs to
the end), temperature 1 with its own seed, steered (``add`` at ``--layer`` with a coefficient from
0, 2, 4, 8) and spread over the base model and two LoRA adapters (r=16 on q/k/v/o, random
weights): a third each. The real app (uvicorn on 127.0.0.1) serves them to the official
``openai`` async client. Sequential: each request alone, in turn (what a server answering one
at a time gives at best). Concurrent: all at once (continuous batching; adapters applied per row).
Each phase runs once untimed first (CUDA graph captures; sequential: one request per adapter),
then timed. The word-level tokenizer
maps token ``i`` to the word ``t{i}``, so prompts are exact token ids.

Bound: :func:`bench.limits.decode_bound` at the concurrent phase's rows (each step reads the
weights once and every row's KV cache), with the copy bandwidth and GEMM rate measured in the
same run: the fastest possible aggregate new tok/s.

    python -m bench.serve --device cuda --model-shape olmo2-7b
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import threading
import time

import torch

from bench.common import (build_model, emit, environment, parse_args, peak_gib, random_tokens,
                          reset_peak)
from bench.limits import copy_bandwidth, decode_bound, gemm_rate
from persona_ops.inference.engine import STATS

COEFS = (0.0, 2.0, 4.0, 8.0)


def word_tokenizer(vocab: int):
    """A tokenizer with one word ``t{i}`` per id and a plain chat template (prompts are the ids themselves)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return fast


def make_adapters(loaded, root: str, count: int = 2) -> dict[str, str]:
    """``count`` random LoRA adapters of the bench model, saved under ``root``; the model is left as it was."""
    from peft import LoraConfig, get_peft_model

    out = {}
    for i in range(count):
        torch.manual_seed(100 + i)
        peft = get_peft_model(loaded.model, LoraConfig(r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                                       init_lora_weights=False))
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.01)
        path = f"{root}/adapter{i}"
        peft.save_pretrained(path)
        loaded.model = peft.unload()
        out[f"adapter{i}"] = path
    return out


class Server:
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


async def send_all(url: str, requests: list[dict], concurrent: bool) -> tuple[float, list]:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=len(requests) + 4, max_keepalive_connections=len(requests) + 4)
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=3600)) as client:
        t0 = time.perf_counter()
        if concurrent:
            out = await asyncio.gather(*(client.chat.completions.create(**r) for r in requests))
        else:
            out = [await client.chat.completions.create(**r) for r in requests]
        return time.perf_counter() - t0, out


def graph_check() -> dict:
    """On CUDA: greedy rows through the batcher (CUDA graphs, per-row cache columns, rows joining
    mid-decode, steered and plain) vs the engine's, on tiny fp32 models."""
    from persona_ops.inference.batcher import Batcher, Job, RowSpec, row_key
    from persona_ops.inference.engine import generate_tokens
    from persona_ops.inference.sampling import SamplingParams
    from persona_ops.interp.interventions import Intervention
    from persona_ops.models.loading import LoadedModel, tiny_model

    out = {}
    prompts = random_tokens(6, 3, 30, 512, 5)
    for arch in ("llama", "qwen3", "olmo2"):
        m = tiny_model(arch, num_layers=3, hidden=64).cuda()
        lm = LoadedModel(model=m, tokenizer=None, label=arch)
        edit = [Intervention("add", 2, torch.randn(64, generator=torch.Generator().manual_seed(1)), coef=4.0)]
        greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
        want = [generate_tokens(lm, [p], greedy, e, eos_ids=[])[0] for p in prompts for e in ((), edit)]

        async def batched(m=m, lm=lm, edit=edit):
            b = Batcher(lm, max_rows=16)
            jobs = []
            for i, p in enumerate(prompts):
                for e in ((), edit):
                    jobs.append(b.submit(Job([RowSpec(p, 12, 0.0, 1.0, row_key(0, 0), edits=e)], None, [])))
                await asyncio.sleep(0.01)  # later rows join a running batch
            rows = []
            for job in jobs:
                tokens = []
                while not tokens or tokens[-1][1] is None:
                    tokens += [(e.token, e.finish) for e in await job.events.get() if hasattr(e, "token")]
                rows.append([t for t, _ in tokens])
            b.close()
            return rows

        out[arch] = asyncio.run(batched()) == want
    return out


def main() -> None:
    def extra(ap):
        ap.add_argument("--requests", type=int, default=64)
        ap.add_argument("--new-tokens", type=int, default=128)
        ap.add_argument("--layer", type=int, default=16)

    args = parse_args(__doc__.splitlines()[0], extra)
    from persona_ops.inference.server import ServerLimits, create_app

    dev = args.device
    loaded = build_model(args.model_shape, dev)
    cfg = loaded.model.config.get_text_config()
    loaded.tokenizer = word_tokenizer(cfg.vocab_size)
    layer = min(args.layer, loaded.num_layers)
    bandwidth, gemm = copy_bandwidth(dev), gemm_rate(dev)
    g = torch.Generator().manual_seed(args.seed + 1)
    vector = torch.randn(loaded.num_layers + 1, loaded.hidden_size, generator=g)
    vector = vector / vector.norm(dim=-1, keepdim=True) * 4.0
    prompts = random_tokens(args.requests, 40, 120, cfg.vocab_size, args.seed)
    with tempfile.TemporaryDirectory() as root:
        adapters = make_adapters(loaded, root)
        names = [loaded.label, *adapters]
        requests = [{"model": names[i % 3], "messages": [{"role": "user", "content": " ".join(f"t{t}" for t in p)}],
                     "max_tokens": args.new_tokens, "temperature": 1.0, "seed": i,
                     "extra_body": {"steering": [{"vector": "v", "layer": layer, "coef": COEFS[i % len(COEFS)]}]}}
                    for i, p in enumerate(prompts)]
        app = create_app(loaded, vectors={"v": vector}, adapters=adapters,
                         limits=ServerLimits(max_batch=args.requests, max_queue=args.requests,
                                             max_request_tokens=1 << 30))
        print(f"shape={args.model_shape} device={dev} requests={args.requests} new={args.new_tokens} "
              f"layer={layer} copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
        with Server(app) as url:
            phases = {}
            for name, concurrent in (("concurrent", True), ("sequential", False)):
                warm, _ = asyncio.run(send_all(url, requests if concurrent else requests[:3], concurrent))
                reset_peak(dev)
                stats_before = dict(app.state.batcher.stats)
                seconds, out = asyncio.run(send_all(url, requests, concurrent))
                tokens = sum(r.usage.completion_tokens for r in out)
                phases[name] = {"seconds": round(seconds, 3), "warmup_seconds": round(warm, 3),
                                "new_tokens": tokens, "new_tokens_per_s": round(tokens / seconds, 1),
                                "decode_steps": app.state.batcher.stats["steps"] - stats_before["steps"],
                                "peak_gib": peak_gib(dev), "texts": [r.choices[0].message.content for r in out]}
                print(f"{name}: {seconds:.2f}s {tokens / seconds:.0f} new tok/s (warm-up {warm:.2f}s), "
                      f"{phases[name]['decode_steps']} decode steps", flush=True)
    same = sum(a == b for a, b in zip(phases["concurrent"].pop("texts"), phases["sequential"].pop("texts")))
    # one forward for every row, whatever its adapter (the chat template adds no token)
    bound = decode_bound(loaded, [len(p) for p in prompts], args.new_tokens, bandwidth, gemm) if dev == "cuda" else None
    conc = phases["concurrent"]
    figures = {
        "bench": "serve", "device": dev, "model_shape": args.model_shape, "requests": args.requests,
        "new_tokens_per_request": args.new_tokens, "layer": layer, "coefficients": list(COEFS),
        "adapters": "base + 2 LoRA (r=16, q/k/v/o), a third each",
        "concurrent_new_tokens_per_s": conc["new_tokens_per_s"],
        "sequential_new_tokens_per_s": phases["sequential"]["new_tokens_per_s"],
        "speedup_concurrent_vs_sequential": round(conc["new_tokens_per_s"] /
                                                  phases["sequential"]["new_tokens_per_s"], 2),
        "identical_completions": f"{same}/{args.requests}",
        "copy_bandwidth_tb_s": round(bandwidth / 1e12, 3) if dev == "cuda" else None,
        "gemm_tflop_s": round(gemm / 1e12, 1) if dev == "cuda" else None,
        "bandwidth_bound_new_tokens_per_s": round(bound, 1) if bound else None,
        "fraction_of_bound": round(conc["new_tokens_per_s"] / bound, 3) if bound else None,
        "phases": phases, "batcher": dict(app.state.batcher.stats), "engine_stats": dict(STATS),
        "env": environment(dev),
    }
    if dev == "cuda":
        figures["greedy_check"] = graph_check()
    emit(figures)


if __name__ == "__main__":
    main()
