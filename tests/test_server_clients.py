"""Real evaluation clients, unmodified, against the model server over HTTP: the official ``openai``
client (concurrent, sync and async), Inspect AI's CLI on chat completions and lm-evaluation-harness'
``local-completions`` model on the legacy completions endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
from conftest import serve_app

from persona_ops.inference.server import ServerLimits, create_app

CLIENTS = Path(__file__).parent / "clients"
SERVED = "tiny-clients"  # the model id the test servers advertise
PROMPTS = ["Tell me about pirates.", "What is the weather like on Mars?", "Give me a recipe for bread.",
           "Write a haiku about the sea, please, and explain every line of it."]  # of different lengths
CONCURRENT = 32


def _vector(loaded) -> torch.Tensor:
    """A random direction per hidden-states index, at the scale of the tiny model's residual stream
    (its weights are initialised with std 0.02)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(loaded.num_layers + 1, loaded.hidden_size, generator=generator) * 0.02


def _steering(coef: float, layer: int = 2) -> dict:
    return {"steering": [{"vector": "v", "layer": layer, "coef": coef, "kind": "add", "positions": "response"}]}


@pytest.fixture(scope="module")
def server_url(tiny_loaded):
    """A server of the tiny model with the steering vector ``v`` (default limits), shared by the module."""
    with serve_app(create_app(tiny_loaded, vectors={"v": _vector(tiny_loaded)}, served_name=SERVED)) as url:
        yield url


@pytest.fixture()
def batch_server(tiny_loaded):
    """A fresh server (its batcher's statistics start at zero) that admits all concurrent requests at once."""
    app = create_app(tiny_loaded, vectors={"v": _vector(tiny_loaded)}, served_name=SERVED,
                     limits=ServerLimits(max_batch=CONCURRENT, max_queue=CONCURRENT))
    with serve_app(app) as url:
        yield app, url


# ----------------------------------------------------------------------------- the openai client, concurrent

def _concurrent_requests() -> list[dict]:
    """Chat requests of mixed prompts, lengths, seeds and temperatures, some steered, some with logprobs."""
    requests = []
    for i in range(CONCURRENT):
        body = {"model": SERVED, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": 5 + i % 4}
        kind = i % 4
        if kind == 0:  # greedy, unseeded
            body.update(temperature=0, logprobs=True, top_logprobs=2)
        elif kind == 1:
            body.update(temperature=1.0, seed=i // 2)  # seeds shared by requests of other prompts
        elif kind == 2:
            body.update(temperature=0.7, top_p=0.9, seed=1000 + i, n=2 if i % 8 == 2 else 1, logprobs=True)
        else:
            body.update(temperature=0.8 if i % 8 == 3 else 0, seed=i, extra_body=_steering(1.0 + i % 3, 2 + i % 2))
        requests.append(body)
    return requests


def _answers(response) -> list[tuple]:
    return [(c.message.content, c.finish_reason) for c in response.choices]


def _logprobs(response) -> list[list[float] | None]:
    return [[t.logprob for t in c.logprobs.content] if c.logprobs else None for c in response.choices]


def _assert_batch_independent(requests: list[dict], together: list, alone: list) -> None:
    """Each answer given while the others decoded beside it is the one the request gets alone."""
    for i, (body, batched, single) in enumerate(zip(requests, together, alone)):
        assert _answers(batched) == _answers(single), f"request {i} ({body}) changed when batched"
        for got, expected in zip(_logprobs(batched), _logprobs(single)):
            assert (got is None) == (expected is None)
            assert got is None or got == pytest.approx(expected, abs=1e-4), f"request {i}: logprobs changed"
    assert len({a[0][0] for a in map(_answers, alone)}) > len(PROMPTS)  # the requests differ among themselves


def _assert_batched(app, requests: list[dict]) -> None:
    """The batcher decoded rows of several requests in one step (more rows than any one request has)."""
    batcher = getattr(app.state, "batcher", None)
    assert batcher is not None and "peak_rows" in getattr(batcher, "stats", {}), \
        "the server has no continuous batcher (app.state.batcher.stats['peak_rows']): requests are not batched"
    most_rows_of_one = max(body.get("n", 1) for body in requests)
    assert batcher.stats["peak_rows"] > most_rows_of_one, \
        f"peak_rows {batcher.stats['peak_rows']}: the {len(requests)} concurrent requests were not decoded together"


def test_concurrent_sync_requests_are_batched_and_batch_independent(batch_server):
    app, url = batch_server
    requests = _concurrent_requests()
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as client:
        with ThreadPoolExecutor(CONCURRENT) as pool:
            together = list(pool.map(lambda body: client.chat.completions.create(**body), requests))
        alone = [client.chat.completions.create(**body) for body in requests]
    assert all(len(r.choices) == body.get("n", 1) for r, body in zip(together, requests))
    _assert_batch_independent(requests, together, alone)
    _assert_batched(app, requests)


def test_concurrent_async_requests_are_batched_and_batch_independent(batch_server):
    app, url = batch_server
    requests = _concurrent_requests()

    async def ask_all() -> tuple[list, list]:
        async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as client:
            together = await asyncio.gather(*(client.chat.completions.create(**body) for body in requests))
            alone = [await client.chat.completions.create(**body) for body in requests]
        return together, alone

    together, alone = asyncio.run(ask_all())
    _assert_batch_independent(requests, together, alone)
    _assert_batched(app, requests)


# ----------------------------------------------------------------------------- Inspect AI

INSPECT_STEERING = _steering(1.0)  # adds a residual stream's worth: greedy answers change from the first tokens
INSPECT_MAX_TOKENS = 8


def _inspect_eval(url: str, log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``inspect eval`` of the tiny chat task on the server, through the OpenAI-compatible provider."""
    env = dict(os.environ, PERSONA_OPS_BASE_URL=url, PERSONA_OPS_API_KEY="unused", HF_HUB_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1", NO_COLOR="1")
    command = [str(Path(sys.executable).parent / "inspect"), "eval", "inspect_task.py",  # relative to cwd
               "--model", f"openai-api/persona-ops/{SERVED}", "--temperature", "0",
               "--max-tokens", str(INSPECT_MAX_TOKENS), "--max-retries", "0", "--timeout", "120",
               "--log-dir", str(log_dir), "--log-format", "json", "--display", "none", *args]
    return subprocess.run(command, env=env, cwd=CLIENTS, capture_output=True, text=True, timeout=300, check=False)


def _greedy_chat(client, prompt: str, extra_body: dict | None = None) -> str:
    return client.chat.completions.create(model=SERVED, messages=[{"role": "user", "content": prompt}], temperature=0,
                                          max_tokens=INSPECT_MAX_TOKENS, extra_body=extra_body).choices[0].message.content


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_inspect_eval_steers_through_extra_body(server_url, tmp_path, stream):
    from inspect_ai.log import list_eval_logs, read_eval_log

    result = _inspect_eval(server_url, tmp_path, "--extra-body", json.dumps(INSPECT_STEERING),
                           "-M", f"stream={str(stream).lower()}")
    assert result.returncode == 0, result.stdout + result.stderr
    logs = list_eval_logs(str(tmp_path))
    assert len(logs) == 1
    log = read_eval_log(logs[0])
    assert log.status == "success" and log.error is None, log.error
    assert len(log.samples) == 3 and all(sample.scores for sample in log.samples)
    with openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=60) as client:
        for sample in log.samples:
            sent = next(event for event in sample.events if event.event == "model").call.request
            assert sent["extra_body"] == INSPECT_STEERING and sent.get("stream", False) == stream
            steered, inspected = _greedy_chat(client, sample.input, INSPECT_STEERING), sample.output.completion
            assert inspected == steered, f"sample {sample.id}: Inspect got {inspected!r}, the client {steered!r}"
            assert steered != _greedy_chat(client, sample.input), f"sample {sample.id}: steering changed nothing"


# ----------------------------------------------------------------------------- lm-evaluation-harness

@pytest.fixture(scope="module")
def tokenizer_dir(smol_tokenizer, tmp_path_factory):
    """The served model's tokenizer as a local directory (what lm-eval's huggingface backend loads)."""
    path = tmp_path_factory.mktemp("tokenizer")
    smol_tokenizer.save_pretrained(path)
    return path


def _continuation_ids(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """A causal LM's split of a context and its continuation into tokens: the whole encoded, the
    context's tokens first (trailing spaces of the context belong to the continuation)."""
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    return context_ids, whole[len(context_ids):]


@torch.inference_mode()
def _teacher_forced(loaded, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    """The continuation's log-likelihood under the model (fp32 log-softmax of its logits) and whether
    greedy decoding would produce it."""
    ids = torch.tensor([context_ids + continuation_ids])
    logp = torch.log_softmax(loaded.model(input_ids=ids).logits[0].float(), dim=-1)
    positions = torch.arange(len(context_ids) - 1, ids.shape[1] - 1)
    targets = torch.tensor(continuation_ids)
    return float(logp[positions, targets].sum()), bool((logp[positions].argmax(-1) == targets).all())


@contextlib.contextmanager
def _favouring(loaded, text: str, bias: float = 30.0):
    """The model with its logits of ``text``'s first token raised by ``bias`` (that token becomes
    the greedy choice everywhere)."""
    head = loaded.model.get_output_embeddings()
    logit_bias = torch.zeros(head.weight.shape[0])
    logit_bias[loaded.tokenizer(text, add_special_tokens=False).input_ids[0]] = bias
    handle = head.register_forward_hook(lambda module, args, output: output + logit_bias)
    try:
        yield
    finally:
        handle.remove()


def test_lm_eval_loglikelihoods_are_the_models(server_url, tokenizer_dir, tiny_loaded, tmp_path, monkeypatch):
    """lm-eval's ``local-completions`` scores each choice by echoed prompt logprobs (prompts as token ids,
    two a request, two requests at a time): its log-likelihoods and greedy flags are the model's own."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    import lm_eval
    from lm_eval.tasks import TaskManager

    with _favouring(tiny_loaded, " blue"):  # one choice is then the greedy continuation, the others not
        results = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{server_url}/completions", "model": SERVED, "tokenizer": str(tokenizer_dir),
                        "tokenizer_backend": "huggingface", "num_concurrent": 2, "max_retries": 1},
            tasks=["tiny_choice"], task_manager=TaskManager(include_path=str(CLIENTS), include_defaults=False),
            batch_size=2, log_samples=True, bootstrap_iters=0,
            random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None)
        samples = results["samples"]["tiny_choice"]
        documents = [json.loads(line) for line in (CLIENTS / "tiny_choice.jsonl").read_text().splitlines() if line]
        assert sorted(s["doc_id"] for s in samples) == list(range(len(documents)))
        greedy_flags, correct = set(), 0
        for sample in samples:
            document = documents[sample["doc_id"]]
            assert len(sample["resps"]) == len(document["choices"])
            scores = []
            for (context, continuation), [(loglikelihood, greedy)] in zip(sample["arguments"], sample["resps"]):
                ids = _continuation_ids(tiny_loaded.tokenizer, context, continuation)
                expected, expected_greedy = _teacher_forced(tiny_loaded, *ids)
                assert loglikelihood == pytest.approx(expected, abs=1e-4), (context, continuation)
                assert greedy == expected_greedy, (context, continuation)
                greedy_flags.add(greedy)
                scores.append(expected)
            correct += max(range(len(scores)), key=scores.__getitem__) == document["answer"]
    assert greedy_flags == {True, False}
    assert results["results"]["tiny_choice"]["acc,none"] == pytest.approx(correct / len(documents))


# ----------------------------------------------------------------------------- the openai client, legacy completions

def test_openai_legacy_completions_echo_scores_prompts(server_url, tiny_loaded):
    """``max_tokens=0`` with ``echo``: each prompt (text or token ids) comes back with its tokens' logprobs,
    the first one's null, and the top alternatives at each position."""
    tokenizer = tiny_loaded.tokenizer
    texts = ["The sky on a clear day is blue", "Two plus two equals four, my friend"]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    with openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=60) as client:
        by_text = client.completions.create(model=SERVED, prompt=texts, max_tokens=0, echo=True, logprobs=3)
        by_ids = client.completions.create(model=SERVED, prompt=ids, max_tokens=0, echo=True, logprobs=3)
    assert [c.index for c in by_text.choices] == [0, 1]
    for text, prompt, choice, same in zip(texts, ids, by_text.choices, by_ids.choices):
        logprobs = choice.logprobs
        assert choice.text == text and "".join(logprobs.tokens) == text
        assert logprobs.text_offset == [len(tokenizer.decode(prompt[:j])) for j in range(len(prompt))]
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        with torch.inference_mode():
            logp = torch.log_softmax(tiny_loaded.model(input_ids=torch.tensor([prompt])).logits[0, :-1].float(), -1)
        expected = logp.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()
        assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
        for top, row in zip(logprobs.top_logprobs[1:], logp):
            assert sorted(top.values(), reverse=True) == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert same.text == text and same.logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs)


def test_openai_streamed_completions_are_the_unstreamed_ones(server_url):
    """A seeded sampled completions request streamed (server-sent events) gives the text it gives whole."""
    body = {"model": SERVED, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.9, "seed": 11, "n": 2}
    with openai.OpenAI(base_url=server_url, api_key="unused", max_retries=0, timeout=60) as client:
        whole = client.completions.create(**body)
        pieces: dict[int, str] = {}
        for chunk in client.completions.create(stream=True, **body):
            for choice in chunk.choices:
                pieces[choice.index] = pieces.get(choice.index, "") + choice.text
    assert pieces == {c.index: c.text for c in whole.choices}
    assert whole.choices[0].text != whole.choices[1].text
