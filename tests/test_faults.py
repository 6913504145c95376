"""Reliability of the OpenAI-compatible client under faults: the judge and the ``openai`` generation backend
against a fault-injecting server on 127.0.0.1 (tests/faultserver.py).

Each test states the exact number of requests, what the judge cache holds after a failure (finished
judgements kept, unusable replies absent), that a rerun asks only what is missing, which error class
comes out (transient: a Prefect stage retry may help; not transient: it cannot) and that the API key
never appears in an error.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from faultserver import Fault, FaultServer, completion_text, expected_score

from persona_ops.errors import InputError, ServiceError, TransientError
from persona_ops.inference.backends import EndpointCfg, OpenAIGenerator
from persona_ops.inference.sampling import SamplingParams
from persona_ops.judge import cache_key, make_judge
from persona_ops.judge.settings import JudgeCfg

SECRET = "sk-test-FAULTS-KEY-0123456789"
KEY_ENV = "PERSONA_OPS_TEST_FAULT_KEY"
PROMPTS = [f"Rate answer {i} from 0 to 100." for i in range(8)]
RETRIES = 2  # 3 attempts per request
TIMEOUT = 30.0  # no request of a loaded test machine takes this long ...
HANG_TIMEOUT = 1.5  # ... and the hang tests' server stays silent far longer than this


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _endpoint(url: str, **kw) -> EndpointCfg:
    settings = dict(base_url=url, model="fault-model", api_key_env=KEY_ENV, max_concurrency=4, max_retries=RETRIES,
                    timeout=TIMEOUT, backoff_base=0.01, backoff_max=0.02)
    return EndpointCfg(**{**settings, **kw})


def _judge(url: str, root, **kw):
    return make_judge(JudgeCfg(backend="openai", cache="judge.sqlite", openai=_endpoint(url, **kw)), root)


def _cached(judge, prompts) -> dict[str, float | None]:
    """prompt -> cached score, for the prompts the cache holds."""
    keys = {cache_key(judge.label, p): p for p in prompts}
    return {keys[k]: v.score for k, v in judge.cache.get_many(keys).items()}


def _expected(prompts) -> dict[str, float | None]:
    return {p: pytest.approx(expected_score(p)) for p in prompts}


def _raised(error_type, call):
    """The error ``call`` raises: of ``error_type``, and without the API key."""
    with pytest.raises(error_type) as info:
        call()
    assert "FAULTS-KEY" not in str(info.value) and "FAULTS-KEY" not in repr(info.value)
    return info.value


def test_fault_server_answers_like_an_openai_server():
    import openai

    with FaultServer() as server, openai.OpenAI(base_url=server.url, api_key="x", max_retries=0) as client:
        assert [m.id for m in client.models.list()] == ["fault-model"]
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "p"}], max_tokens=1,
                                           logprobs=True, top_logprobs=20)
        assert len(r.choices[0].logprobs.content[0].top_logprobs) == 3
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "p"}], n=2, seed=5)
        assert [c.message.content for c in r.choices] == [completion_text("p", 5, 0), completion_text("p", 5, 1)]
    assert server.counts == {"p": 2}


# ----------------------------------------------------------------------------- judge: unusable replies


def test_a_reply_without_logprobs_is_retried_then_reported_never_cached(tmp_path):
    bad = PROMPTS[3]
    with FaultServer([Fault("no_logprobs", match="answer 3", times=None)]) as server:
        judge = _judge(server.url, tmp_path)
        err = _raised(ServiceError, lambda: judge.score(PROMPTS))
        assert not isinstance(err, TransientError)
        assert "1 of 8 requests failed" in str(err) and "without logprobs" in str(err)
        assert server.counts == {**{p: 1 for p in PROMPTS}, bad: RETRIES + 1}
        assert _cached(judge, PROMPTS) == _expected(p for p in PROMPTS if p != bad)  # never a NULL for it

        server.clear()
        rerun = _judge(server.url, tmp_path)
        assert rerun.score(PROMPTS) == [pytest.approx(expected_score(p)) for p in PROMPTS]
        assert rerun.backend_calls == 1 and server.counts[bad] == RETRIES + 2
        assert sum(server.counts.values()) == len(PROMPTS) + RETRIES + 1


def test_a_refusal_is_a_legitimate_null_score_cached_and_not_asked_again(tmp_path):
    """Too little numeric mass (persona_vectors' rule), or an answer that ends at once: NULL, once."""
    prompts = ["REFUSE to rate this.", "SILENT, please.", PROMPTS[0]]
    with FaultServer() as server:
        judge = _judge(server.url, tmp_path)
        assert judge.score(prompts) == [None, None, pytest.approx(expected_score(PROMPTS[0]))]
        assert _cached(judge, prompts) == {prompts[0]: None, prompts[1]: None, **_expected(PROMPTS[:1])}
        rerun = _judge(server.url, tmp_path)
        assert rerun.score(prompts)[:2] == [None, None] and rerun.backend_calls == 0
    assert server.counts == {p: 1 for p in prompts}


@pytest.mark.parametrize("kind", ["malformed", "wrong_shape"])
def test_a_malformed_body_is_retried_then_reported_never_cached(tmp_path, kind):
    with FaultServer([Fault(kind, match="answer 0"), Fault(kind, match="answer 5", times=None)]) as server:
        judge = _judge(server.url, tmp_path)
        err = _raised(ServiceError, lambda: judge.score(PROMPTS))
        assert "1 of 8 requests failed" in str(err)
        assert server.counts == {**{p: 1 for p in PROMPTS}, PROMPTS[0]: 2, PROMPTS[5]: RETRIES + 1}
        assert _cached(judge, PROMPTS) == _expected(p for p in PROMPTS if p != PROMPTS[5])


# ----------------------------------------------------------------------------- judge: transient faults


TRANSIENT = {
    "429": Fault("status", status=429, headers={"Retry-After": "0.01"}, message="rate limited"),
    "500": Fault("status", status=500),
    "hang": Fault("hang", seconds=30),
    "drop": Fault("drop"),
}
UNUSABLE = {"malformed": Fault("malformed"), "wrong_shape": Fault("wrong_shape"),
            "no_logprobs": Fault("no_logprobs")}


@pytest.mark.parametrize("name", [*TRANSIENT, *UNUSABLE])
def test_one_fault_costs_one_more_request(tmp_path, name):
    fault = replace({**TRANSIENT, **UNUSABLE}[name], match="answer 1")
    with FaultServer([fault]) as server:
        scores = _judge(server.url, tmp_path, timeout=HANG_TIMEOUT if name == "hang" else TIMEOUT).score(PROMPTS[:4])
    assert scores == [pytest.approx(expected_score(p)) for p in PROMPTS[:4]]
    assert server.counts == {**{p: 1 for p in PROMPTS[:4]}, PROMPTS[1]: 2}


@pytest.mark.parametrize("name, error, attempts", [
    *((n, TransientError, RETRIES + 1) for n in TRANSIENT),
    *((n, ServiceError, RETRIES + 1) for n in UNUSABLE),
    ("400", ServiceError, 1),
    ("quota", ServiceError, 1),
])
def test_a_persistent_fault_keeps_the_rest_and_raises_the_right_class(tmp_path, name, error, attempts):
    from tasks.stages import retry_transient

    faults = {**TRANSIENT, **UNUSABLE, "400": Fault("status", status=400, message=f"bad request ({SECRET})"),
              "quota": Fault("status", status=429, code="insufficient_quota", message="You exceeded your quota")}
    fault = replace(faults[name], match="answer 1", times=None)
    with FaultServer([fault]) as server:
        judge = _judge(server.url, tmp_path, timeout=HANG_TIMEOUT if name == "hang" else TIMEOUT)
        err = _raised(error, lambda: judge.score(PROMPTS[:4]))
        assert "1 of 4 requests failed" in str(err)
        assert isinstance(err, TransientError) == (error is TransientError)
        assert server.counts == {**{p: 1 for p in PROMPTS[:4]}, PROMPTS[1]: attempts}
        assert _cached(judge, PROMPTS[:4]) == _expected([PROMPTS[0], *PROMPTS[2:4]])

    class Failed:  # a Prefect state whose result raises the error
        def result(self):
            raise err

    assert retry_transient(None, None, Failed()) is (error is TransientError)


def test_stage_retries_ask_only_what_is_missing(tmp_path):
    """40 prompts, one failing on every attempt: each stage retry sends only its requests again
    (before: every retry asked all 40 again, 147 requests)."""
    prompts = [f"Rate answer {i} from 0 to 100." for i in range(40)]
    with FaultServer([Fault("status", status=503, match="answer 17 ", times=None)]) as server:
        for _ in range(3):  # the first run and two stage retries
            judge = _judge(server.url, tmp_path)
            _raised(TransientError, lambda: judge.score(prompts))
        assert len(_cached(judge, prompts)) == 39
        assert sum(server.counts.values()) == 39 + 3 * (RETRIES + 1)
        server.clear()
        judge = _judge(server.url, tmp_path)
        assert judge.score(prompts) == [pytest.approx(expected_score(p)) for p in prompts]
        assert judge.backend_calls == 1 and sum(server.counts.values()) == 39 + 3 * (RETRIES + 1) + 1


def test_a_transient_and_an_unusable_failure_together_are_not_transient(tmp_path):
    faults = [Fault("status", status=500, match="answer 1", times=None),
              Fault("no_logprobs", match="answer 2", times=None)]
    with FaultServer(faults) as server:
        err = _raised(ServiceError, lambda: _judge(server.url, tmp_path).score(PROMPTS[:4]))
    assert not isinstance(err, TransientError)
    assert "2 of 4 requests failed" in str(err) and "HTTP 500" in str(err) and "without logprobs" in str(err)


def test_a_wrong_key_stops_sending_and_never_shows_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-FAULTS-KEY-wrong-987654")
    with FaultServer(api_key=SECRET) as server:
        judge = _judge(server.url, tmp_path, max_concurrency=1)
        err = _raised(ServiceError, lambda: judge.score(PROMPTS))
    assert "HTTP 401" in str(err) and "7 not sent" in str(err)
    assert sum(server.counts.values()) == 1 and len(judge.cache) == 0


def test_a_failing_chunk_stops_the_judge_after_that_chunk(tmp_path):
    with FaultServer([Fault("status", status=500, match="answer 0", times=None)]) as server:
        judge = _judge(server.url, tmp_path)
        judge.chunk_size = 4
        err = _raised(TransientError, lambda: judge.score(PROMPTS))
        assert "4 more prompts not asked" in str(err)
        assert server.counts == {**{p: 1 for p in PROMPTS[1:4]}, PROMPTS[0]: RETRIES + 1}
        assert set(_cached(judge, PROMPTS)) == set(PROMPTS[1:4])


# ----------------------------------------------------------------------------- the openai generation backend


CHATS = [[{"role": "user", "content": f"question {i}"}] for i in (0, 0, 1, 2, 2, 3)]  # runs: 0 0 | 1 | 2 2 | 3
SAMPLING = SamplingParams(max_new_tokens=4, temperature=1.0, top_p=1.0, seed=10)


def _answers(chats=CHATS, seed: int = SAMPLING.seed) -> list[str]:
    """What the server answers: one request per run of identical chats, seed + run index."""
    out, run, prev = [], -1, None
    for chat in chats:
        if chat != prev:
            run, index, prev = run + 1, 0, chat
        out.append(completion_text(chat[-1]["content"], seed + run, index))
        index += 1
    return out


def _generator(url: str, **kw) -> OpenAIGenerator:
    return OpenAIGenerator(_endpoint(url, **kw), "generate", tokenizer=None)


@pytest.mark.parametrize("kind", ["malformed", "wrong_shape", "drop"])
def test_generation_retries_a_bad_reply(kind):
    with FaultServer([Fault(kind, match="question 2")]) as server:
        assert _generator(server.url).generate(CHATS, SAMPLING) == _answers()
    assert server.counts == {"question 0": 1, "question 1": 1, "question 2": 2, "question 3": 1}


@pytest.mark.parametrize("fault, error", [(Fault("status", status=502, times=None), TransientError),
                                          (Fault("malformed", times=None), ServiceError)])
def test_generation_keeps_the_answers_received_before_a_failure(fault, error):
    fault.match = "question 2"
    received: dict[int, str] = {}

    def keep(indices, answers):
        received.update(zip(indices, answers))

    with FaultServer([fault]) as server:
        err = _raised(error, lambda: _generator(server.url).generate(CHATS, SAMPLING, on_result=keep))
    assert "1 of 4 requests failed" in str(err)
    assert isinstance(err, TransientError) == (error is TransientError)
    expected = _answers()
    assert received == {i: expected[i] for i in (0, 1, 2, 5)}
    assert server.counts == {"question 0": 1, "question 1": 1, "question 2": RETRIES + 1, "question 3": 1}


def test_service_errors_are_input_errors_for_the_cli():
    """ServiceError is shown like bad input (no traceback) and never retried; TransientError is retried."""
    assert issubclass(ServiceError, InputError) and not issubclass(ServiceError, TransientError)


def test_generation_from_a_server_without_n_is_not_retried():
    """A server that ignores ``n`` answers one choice: deterministic, so each request is sent once."""
    from faultserver import CHAT, chat_completion, chat_subject

    def one_choice(request):
        reply = chat_completion(request)
        reply.body["choices"] = reply.body["choices"][:1]
        return reply

    with FaultServer() as server:
        server.route("POST", CHAT, one_choice, chat_subject)
        err = _raised(ServiceError, lambda: _generator(server.url).generate(CHATS, SAMPLING))
    assert "2 of 4 requests failed" in str(err) and "asked for n=2 completions, got 1" in str(err)
    assert server.counts == {"question 0": 1, "question 1": 1, "question 2": 1, "question 3": 1}
