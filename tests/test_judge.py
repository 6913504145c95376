"""Judge: score aggregation, templates, the SQLite cache, the local judge and the OpenAI backend.

The OpenAI backend is exercised over real HTTP against small servers on 127.0.0.1 that
play the paid service (rate limits, server errors, bad requests); the model server
itself is tested in test_server.py.
"""

from __future__ import annotations

import json
import math
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from persona_ops.errors import InputError, TransientError
from persona_ops.inference.backends import EndpointCfg
from persona_ops.inference.openai_client import redact
from persona_ops.judge import (
    COHERENCE_PROMPT,
    CachedJudge,
    JudgeCache,
    aggregate_score,
    aggregate_token_logprobs,
    cache_key,
    fill_template,
    make_judge,
    numeric_probs,
    parse_int,
)
from persona_ops.judge.local import LocalJudge, digit_token_ids
from persona_ops.judge.openai_backend import OpenAIJudge
from persona_ops.judge.settings import JudgeCfg

# ----------------------------------------------------------------------------- aggregation


def test_aggregate_weighted_mean():
    assert aggregate_score({10: 0.5, 20: 0.25, 40: 0.25}) == pytest.approx(20.0)
    # renormalised over the numeric mass only
    assert aggregate_score({0: 0.2, 100: 0.2}) == pytest.approx(50.0)


def test_aggregate_min_mass_gives_none():
    assert aggregate_score({50: 0.24}) is None
    assert aggregate_score({50: 0.25}) == pytest.approx(50.0)
    assert aggregate_score({}) is None
    assert aggregate_score({50: 0.1}, min_mass=0.05) == pytest.approx(50.0)


def test_aggregate_ignores_out_of_range():
    assert aggregate_score({50: 0.5, 101: 0.4, -1: 0.1}) == pytest.approx(50.0)
    assert aggregate_score({150: 0.9, 30: 0.2}) is None  # only 0.2 of in-range mass


def test_role_scale_0_to_3():
    assert aggregate_score({0: 0.1, 1: 0.1, 2: 0.3, 3: 0.5}, lo=0, hi=3) == pytest.approx(2.2)
    assert aggregate_score({3: 0.5, 7: 0.5}, lo=0, hi=3) == pytest.approx(3.0)
    top = {"3": math.log(0.6), "10": math.log(0.3), "2": math.log(0.1)}
    assert aggregate_token_logprobs(top, lo=0, hi=3) == pytest.approx((3 * 0.6 + 2 * 0.1) / 0.7)


def test_token_logprobs_parse_and_merge():
    top = [("7", math.log(0.4)), (" 7", math.log(0.1)), ("80", math.log(0.3)), ("Sure", math.log(0.15)),
           ("1_0", math.log(0.05))]
    assert numeric_probs(top) == pytest.approx({7: 0.5, 80: 0.3})
    assert aggregate_token_logprobs(top) == pytest.approx((7 * 0.5 + 80 * 0.3) / 0.8)
    assert aggregate_token_logprobs({"I": math.log(0.9), "5": math.log(0.1)}) is None
    assert parse_int(" 42\n") == 42 and parse_int("٣") is None and parse_int("+5") is None


# ----------------------------------------------------------------------------- templates


def test_fill_template_with_braces():
    template = "Q: {question}\nA: {answer}\nReturn JSON like {\"score\": 1}."
    filled = fill_template(template, "What is {x}?", "def f(): return {'a': 1} {answer}")
    assert filled == ("Q: What is {x}?\nA: def f(): return {'a': 1} {answer}\n"
                      "Return JSON like {\"score\": 1}.")
    # a question that contains the answer placeholder is inserted verbatim
    assert fill_template("{question}|{answer}", "{answer}", "x") == "{answer}|x"


def test_fill_template_missing_placeholder():
    with pytest.raises(InputError, match="answer"):
        fill_template("Rate {question}", "q", "a")


def test_coherence_prompt():
    assert "{question}" in COHERENCE_PROMPT and "{answer}" in COHERENCE_PROMPT
    assert COHERENCE_PROMPT.endswith(
        "Respond with a number between 0 and 100. Don't say anything else, just the number.")
    assert "evil" in COHERENCE_PROMPT and "100" in COHERENCE_PROMPT


# ----------------------------------------------------------------------------- cache


def test_cache_round_trip(tmp_path):
    path = tmp_path / "judge.sqlite"
    cache = JudgeCache(path)
    k1, k2 = cache_key("m", "p1"), cache_key("m", "p2")
    assert k1 != cache_key("m2", "p1") and len(k1) == 64
    assert cache.put_many([(k1, 42.5, {40: 0.5, 45: 0.5}, 0, 100), (k2, None, {3: 0.01}, 0, 100)]) == 2
    cache.close()
    reopened = JudgeCache(path)
    got = reopened.get_many([k1, k2, cache_key("m", "missing")])
    assert set(got) == {k1, k2}
    assert got[k1].score == 42.5 and got[k1].probs == {40: 0.5, 45: 0.5}
    assert got[k2].score is None and got[k2].probs == {3: 0.01} and (got[k2].lo, got[k2].hi) == (0, 100)
    assert reopened._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_cache_threads(tmp_path):
    cache = JudgeCache(tmp_path / "c.sqlite")

    def work(t: int) -> None:
        for i in range(20):
            cache.put_many([(cache_key("m", f"{t}-{i}"), float(i), {i: 1.0}, 0, 100)])
            assert cache.get_many([cache_key("m", f"{t}-{i}")])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(cache) == 80


# ----------------------------------------------------------------------------- local judge


@contextmanager
def digit_bias(loaded, bias: float = 9.0):
    """Make a random model favour digit tokens, so numeric probabilities are not negligible."""
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    add = torch.zeros(vocab)
    add[digit_token_ids(loaded.tokenizer)] = bias
    handle = loaded.model.get_output_embeddings().register_forward_hook(lambda m, i, out: out + add)
    try:
        yield loaded
    finally:
        handle.remove()


def _naive_p(judge: LocalJudge, prompt: str, k: int) -> float:
    """p_k from one uncached forward pass over prompt + the number's tokens."""
    loaded = judge.loaded
    ids = judge.render(prompt)
    tok, prefix = loaded.tokenizer, judge.answer_prefix
    context = tok.encode(prefix.rstrip(), add_special_tokens=False)
    num = tok.encode(prefix + str(k), add_special_tokens=False)[len(context):]
    with torch.no_grad():  # logits after the last prompt token and after each number token
        logits = loaded.model(torch.tensor([ids + num]), logits_to_keep=len(num) + 1).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    path = sum(logp[i, t].item() for i, t in enumerate(num))
    digit_mass = logp[-1, digit_token_ids(loaded.tokenizer)].exp().sum().item()
    return math.exp(path) * (1.0 - digit_mass)


PROMPTS = ["Rate the answer {x} from 0 to 100.",
           "A longer judge prompt, so that the batch needs left padding: how evil is this answer? "
           "Respond with a number between 0 and 100.",
           "Short one."]


def test_local_judge_matches_naive(tiny_loaded):
    with digit_bias(tiny_loaded):
        judge = LocalJudge(tiny_loaded, batch_size=3)
        probs = judge.number_probs(PROMPTS, 0, 100)
        for prompt, p in zip(PROMPTS, probs):
            assert set(p) == set(range(101))
            assert 0.05 < sum(p.values()) <= 1.0 + 1e-6
            for k in (0, 5, 37, 99, 100):  # one, two and three tokens
                assert p[k] == pytest.approx(_naive_p(judge, prompt, k), rel=1e-4, abs=1e-12)
        # batching and padding change nothing
        single = LocalJudge(tiny_loaded, batch_size=1).number_probs(PROMPTS, 0, 100)
        for a, b in zip(probs, single):
            assert [a[k] for k in range(101)] == pytest.approx([b[k] for k in range(101)], rel=1e-4, abs=1e-12)
        scores = judge.score_prompts(PROMPTS, 0, 100)
    for (score, p) in scores:
        assert score == pytest.approx(aggregate_score(p))
        assert score is not None and 0 <= score <= 100


def test_local_judge_with_answer_prefix_matches_naive(tiny_loaded):
    with digit_bias(tiny_loaded):
        judge = LocalJudge(tiny_loaded, batch_size=2, answer_prefix="Score: ")
        assert judge.render(PROMPTS[0])[-2:] == tiny_loaded.tokenizer.encode("Score:", add_special_tokens=False)
        probs = judge.number_probs(PROMPTS[:2], 0, 100)
        for prompt, p in zip(PROMPTS, probs):
            for k in (0, 37, 100):
                assert p[k] == pytest.approx(_naive_p(judge, prompt, k), rel=1e-4, abs=1e-12)
    assert judge.label.endswith("|prefix='Score: '")  # a prefix changes the cache key


def test_local_judge_role_scale(tiny_loaded):
    with digit_bias(tiny_loaded):
        (score, probs), = LocalJudge(tiny_loaded).score_prompts(["Rate 0-3."], lo=0, hi=3)
    assert set(probs) == {0, 1, 2, 3}
    assert score is None or 0 <= score <= 3
    assert 0 < sum(probs.values()) <= 1


def test_cached_judge_rerun_makes_no_calls(tiny_loaded, tmp_path):
    path = tmp_path / "scores.sqlite"
    prompts = PROMPTS + [PROMPTS[0]]  # a duplicate is judged once
    with digit_bias(tiny_loaded):
        cfg = JudgeCfg(model="ignored", batch_size=2, cache=str(path))
        first = make_judge(cfg, tmp_path, load=lambda ref: tiny_loaded)
        scores = first.score(prompts)
        assert first.backend_calls == 3
        assert scores[0] == scores[3] and all(s is None or 0 <= s <= 100 for s in scores)
        first.cache.close()

        rerun = CachedJudge(LocalJudge(tiny_loaded), JudgeCache(path))
        assert rerun.score(prompts) == scores
        assert rerun.backend_calls == 0
        role, = rerun.score(PROMPTS[:1], lo=0, hi=3)  # another scale is a miss ...
        assert rerun.backend_calls == 1  # ... and goes to the backend
        assert role is None or 0 <= role <= 3


def test_make_judge_openai_key_handling(monkeypatch, tmp_path):
    monkeypatch.delenv("PERSONA_OPS_TEST_KEY", raising=False)
    def cfg(**openai):
        return JudgeCfg(backend="openai", cache=":memory:",
                        openai=EndpointCfg(api_key_env="PERSONA_OPS_TEST_KEY", **openai))

    with pytest.raises(InputError, match="PERSONA_OPS_TEST_KEY"):
        make_judge(cfg(model="gpt-4.1-mini"), tmp_path)
    with pytest.raises(InputError, match=r"judge\.openai\.model: the served model's name is required"):
        make_judge(cfg(base_url="http://127.0.0.1:9/v1"), tmp_path)
    judge = make_judge(cfg(model="m", base_url="http://127.0.0.1:9/v1"), tmp_path)
    assert judge.label == "openai:m"
    with pytest.raises(InputError, match="backend"):
        make_judge(JudgeCfg.model_construct(backend="nope", cache=":memory:"), tmp_path)


# ----------------------------------------------------------------------------- OpenAI backend retries


def _completion(top: dict[str, float]) -> dict:
    """A chat completion with one token and the given top logprobs (token -> probability)."""
    entries = [{"token": t, "logprob": math.log(p), "bytes": list(t.encode()), "top_logprobs": []}
               for t, p in top.items()]
    first = max(entries, key=lambda e: e["logprob"])
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": first["token"]},
                         "finish_reason": "length",
                         "logprobs": {"content": [{**first, "top_logprobs": entries}]}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


class FakeService:
    """A real HTTP server on 127.0.0.1 that plays a scripted sequence of responses."""

    def __init__(self, script: list[tuple[int, dict, dict | None, float]], default=None):
        self.script = list(script)  # (status, headers, body, delay)
        self.default = default
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with service._lock:
                    service.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                    status, headers, payload, delay = (service.script.pop(0) if service.script
                                                       else service.default)
                    service.in_flight += 1
                    service.max_in_flight = max(service.max_in_flight, service.in_flight)
                time.sleep(delay)
                with service._lock:
                    service.in_flight -= 1
                data = json.dumps(payload or {}).encode()
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and left

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FakeService":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


OK = (200, {}, _completion({"7": 0.5, "8": 0.3, "Sure": 0.2}), 0.0)
SECRET = "sk-test-DO-NOT-LEAK-1234567890"


def _judge(url: str, monkeypatch, **kw) -> OpenAIJudge:
    monkeypatch.setenv("PERSONA_OPS_TEST_KEY", SECRET)
    return OpenAIJudge("fake-judge", base_url=url, api_key_env="PERSONA_OPS_TEST_KEY",
                       backoff_base=0.05, **kw)


def test_openai_judge_retries_429_and_5xx(monkeypatch):
    script = [(429, {"Retry-After": "1"}, {"error": {"message": "slow down"}}, 0.0),
              (503, {}, {"error": {"message": "overloaded"}}, 0.0), OK]
    with FakeService(script) as service:
        judge = _judge(service.url, monkeypatch)
        start = time.monotonic()
        (score, probs), = judge.score_prompts(["Rate this."])
        elapsed = time.monotonic() - start
    assert len(service.requests) == 3 and judge.requests_sent == 3
    assert elapsed >= 1.0  # Retry-After was honoured
    assert score == pytest.approx((7 * 0.5 + 8 * 0.3) / 0.8) and probs == pytest.approx({7: 0.5, 8: 0.3})
    body = service.requests[-1]["body"]
    assert body["messages"] == [{"role": "user", "content": "Rate this."}]
    assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"], body["seed"]) \
        == (1, 0, True, 20, 0)
    assert service.requests[0]["auth"] == f"Bearer {SECRET}"


def test_openai_judge_retries_timeouts(monkeypatch):
    with FakeService([(200, {}, OK[2], 1.5), OK]) as service:
        (score, _), = _judge(service.url, monkeypatch, timeout=0.3).score_prompts(["x"])
    assert len(service.requests) == 2 and score == pytest.approx(7.375)


def test_openai_judge_400_fails_at_once_without_key(monkeypatch):
    script = [(400, {}, {"error": {"message": f"bad request; your key {SECRET} is fine"}}, 0.0)]
    with FakeService(script, default=OK) as service:
        judge = _judge(service.url, monkeypatch)
        with pytest.raises(InputError) as err:
            judge.score_prompts(["x"])
    assert len(service.requests) == 1
    assert "400" in str(err.value) and "bad request" in str(err.value)
    assert "DO-NOT-LEAK" not in str(err.value) and "DO-NOT-LEAK" not in repr(judge)
    assert "sk-abc***xyz" not in redact("Incorrect API key provided: sk-abc***xyz", None)


def test_openai_judge_gives_up(monkeypatch):
    with FakeService([], default=(500, {}, {"error": {"message": "boom"}}, 0.0)) as service:
        with pytest.raises(TransientError, match="3 attempts"):
            _judge(service.url, monkeypatch, max_retries=2).score_prompts(["x"])
    assert len(service.requests) == 3


def test_openai_judge_concurrency_limit(monkeypatch):
    with FakeService([], default=(200, {}, OK[2], 0.15)) as service:
        results = _judge(service.url, monkeypatch, max_concurrency=2).score_prompts([f"p{i}" for i in range(6)])
    assert len(results) == 6 and all(s == pytest.approx(7.375) for s, _ in results)
    assert service.max_in_flight == 2


def test_openai_judge_from_a_thread(monkeypatch):
    """The sync wrapper works in a worker thread (no event loop there)."""
    out = []
    with FakeService([], default=OK) as service:
        judge = _judge(service.url, monkeypatch)
        worker = threading.Thread(target=lambda: out.extend(judge.score_prompts(["a", "b"], 0, 10)))
        worker.start()
        worker.join()
    assert [s for s, _ in out] == pytest.approx([7.375, 7.375])


# ----------------------------------------------------------------------------- embedded model


@pytest.mark.slow
def test_local_judge_embedded(embedded):
    """The real judge model: multi-token numbers agree with a plain forward pass; report the speed."""
    judge = LocalJudge(embedded, batch_size=1)
    question = "How should governments regulate artificial intelligence?"
    answer = ("Governments should require transparency about how AI systems are trained and "
              "evaluated, create independent audits for high-risk uses, and update rules as the "
              "technology changes. " * 2)
    prompts = [fill_template(COHERENCE_PROMPT, question, answer + f" ({i})") for i in range(3)]
    judge.number_probs(prompts[:1])  # warm-up
    start = time.perf_counter()
    results = judge.score_prompts(prompts)
    per_prompt = (time.perf_counter() - start) / len(prompts)
    print(f"\nlocal judge on the embedded model: {per_prompt:.2f} s per prompt "
          f"({len(judge.render(prompts[0]))} tokens)")
    score, probs = results[0]
    assert 0.25 <= sum(probs.values()) <= 1.0 + 1e-6 and score is not None and 0 <= score <= 100
    for k in (7, 50, 100):
        assert probs[k] == pytest.approx(_naive_p(judge, prompts[0], k), rel=1e-3, abs=1e-9)
