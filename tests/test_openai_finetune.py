"""The OpenAI fine-tuning backend (persona_ops/training/openai_ft.py) with the real ``openai`` client against
the fine-tuning API of the local fault server (tests/faultserver.py): exact request counts per route, the
error class of each failure, resumption after a crash (one upload, one job), and no API key in any error or file.
"""

from __future__ import annotations

import json

import openai
import pytest
from faultserver import CANCEL, EVENTS, FILES, JOB, JOBS, Fault, FaultServer, FineTuneAPI

from persona_ops.errors import InputError, ServiceError, TransientError
from persona_ops.inference.backends import EndpointCfg
from persona_ops.training.openai_ft import OpenAIFineTuneCfg, cancel_job, fine_tune, train_with_openai

SECRET = "sk-test-FINETUNE-KEY-0123456789"
KEY_ENV = "PERSONA_OPS_TEST_FT_KEY"
CHATS = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Yes {i}."}]}
         for i in range(3)]
POLLS = 3  # validating_files -> queued -> running -> succeeded


class Crash(Exception):
    """Stands for the process dying mid-poll."""


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


@pytest.fixture
def server():
    with FaultServer(api_key=SECRET) as s:
        s.api = FineTuneAPI(s)
        yield s


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    return path


def _cfg(url: str | None, **kw) -> OpenAIFineTuneCfg:
    endpoint = EndpointCfg(base_url=url, api_key_env=KEY_ENV, max_retries=2, timeout=30.0, backoff_base=0.01,
                           backoff_max=0.02)
    settings = dict(model="gpt-4.1-mini-2025-04-14", endpoint=endpoint, n_epochs=2, suffix="evil",
                    poll_interval=0.01, poll_interval_max=0.02)
    return OpenAIFineTuneCfg(**{**settings, **kw})


def _requests(server) -> dict[str, int]:
    return {route: sum(counts.values()) for route, counts in server.route_counts.items()}


def _no_key(*texts) -> None:
    for text in texts:
        assert "FINETUNE-KEY" not in text


def _files(out) -> list[str]:
    return [p.read_text() for p in sorted(out.iterdir())]


def test_happy_path_uploads_the_dataset_byte_for_byte_and_returns_the_model(server, dataset, tmp_path):
    out = tmp_path / "out"
    result = train_with_openai(dataset, out, _cfg(server.url))
    job = server.api.jobs[result.job_id]
    assert (result.status, result.fine_tuned_model) == ("succeeded", job["fine_tuned_model"])
    assert result.job_id.startswith("ftjob-") and result.file_id.startswith("file-") and not result.resumed
    assert server.api.files[result.file_id] == dataset.read_bytes()
    assert result.trained_tokens == 2 * len(dataset.read_bytes())  # two epochs
    assert result.dataset_sha256 == __import__("hashlib").sha256(dataset.read_bytes()).hexdigest()
    [created] = server.api.created
    assert created["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": 2, "learning_rate_multiplier": "auto", "batch_size": "auto"}
    assert (created["seed"], created["suffix"], created["model"]) == (0, "evil", "gpt-4.1-mini-2025-04-14")
    assert _requests(server) == {FILES: 1, JOBS: 1, JOB: POLLS, EVENTS: 1}
    assert json.loads((out / "result.json").read_text()) == result.model_dump()
    state = json.loads((out / "job.json").read_text())
    assert (state["file_id"], state["job_id"]) == (result.file_id, result.job_id)
    events = [json.loads(line)["message"] for line in (out / "events.jsonl").read_text().splitlines()]
    assert events[0] == "Validating training file" and events[-1] == "Job is succeeded"
    _no_key(*_files(out))

    again = train_with_openai(dataset, out, _cfg(server.url))  # finished: no request at all
    assert again == result and _requests(server) == {FILES: 1, JOBS: 1, JOB: POLLS, EVENTS: 1}


def test_transient_faults_are_retried_with_exact_request_counts(server, dataset, tmp_path):
    server.add(Fault("drop", route=FILES), Fault("status", route=JOBS, status=429, headers={"Retry-After": "0"}),
               Fault("status", route=JOB, status=500), Fault("drop", route=JOB))
    result = train_with_openai(dataset, tmp_path / "out", _cfg(server.url))
    assert result.status == "succeeded"
    assert _requests(server) == {FILES: 2, JOBS: 2, JOB: POLLS + 2, EVENTS: 1}
    assert len(server.api.files) == 1 and len(server.api.jobs) == 1  # the faults came before the work


def test_polling_outages_outlasting_the_retries_are_transient_and_a_rerun_resumes(server, dataset, tmp_path):
    out = tmp_path / "out"
    server.add(Fault("status", route=JOB, status=500, times=None))
    with pytest.raises(TransientError, match="polling job ftjob-.*gave up after 3 attempts") as info:
        train_with_openai(dataset, out, _cfg(server.url))
    _no_key(str(info.value))
    assert _requests(server)[JOB] == 3
    server.clear()
    result = train_with_openai(dataset, out, _cfg(server.url))
    assert result.resumed and _requests(server) == {FILES: 1, JOBS: 1, JOB: 3 + POLLS, EVENTS: 1}


def test_a_failed_job_is_a_service_error_with_its_message_not_retried(server, dataset, tmp_path):
    server.api.fail_with = {"code": "invalid_training_file", "message": "The file has too few examples"}
    out = tmp_path / "out"
    with pytest.raises(ServiceError, match="failed: invalid_training_file: The file has too few examples") as info:
        train_with_openai(dataset, out, _cfg(server.url))
    _no_key(str(info.value))
    assert _requests(server) == {FILES: 1, JOBS: 1, JOB: POLLS, EVENTS: 1}
    assert not (out / "result.json").exists()
    with pytest.raises(ServiceError, match="too few examples"):  # a rerun reports the same job, creates none
        train_with_openai(dataset, out, _cfg(server.url))
    assert _requests(server)[JOBS] == 1 and len(server.api.jobs) == 1


def test_a_crash_after_the_job_was_created_resumes_that_job(server, dataset, tmp_path):
    out = tmp_path / "out"

    def crash(job):
        raise Crash(job["status"])

    with pytest.raises(Crash):
        train_with_openai(dataset, out, _cfg(server.url), on_poll=crash)
    [job_id] = server.api.jobs
    assert json.loads((out / "job.json").read_text())["job_id"] == job_id and not (out / "result.json").exists()
    result = train_with_openai(dataset, out, _cfg(server.url))
    assert result.job_id == job_id and result.resumed
    assert _requests(server) == {FILES: 1, JOBS: 1, JOB: POLLS, EVENTS: 1}


def test_a_refused_create_keeps_the_upload_for_the_rerun(server, dataset, tmp_path):
    out = tmp_path / "out"
    server.add(Fault("status", route=JOBS, status=400, message="model not available for fine-tuning"))
    with pytest.raises(ServiceError, match="creating the fine-tuning job: .*model not available"):
        train_with_openai(dataset, out, _cfg(server.url))
    assert _requests(server) == {FILES: 1, JOBS: 1}  # a 400 is not retried
    assert train_with_openai(dataset, out, _cfg(server.url)).status == "succeeded"
    assert _requests(server)[FILES] == 1 and len(server.api.files) == 1


def test_polling_past_max_wait_is_transient_and_a_rerun_polls_on(server, dataset, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TransientError, match="still queued after .*rerun to resume"):
        train_with_openai(dataset, out, _cfg(server.url, max_wait=0.001))
    assert _requests(server)[JOB] == 1
    assert train_with_openai(dataset, out, _cfg(server.url)).resumed
    assert _requests(server)[JOBS] == 1


def test_a_cancelled_job_is_reported(server, dataset, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Crash):
        train_with_openai(dataset, out, _cfg(server.url), on_poll=lambda job: (_ for _ in ()).throw(Crash()))
    assert cancel_job(out, _cfg(server.url)) == "cancelled"
    with pytest.raises(ServiceError, match="cancelled: no error given"):
        train_with_openai(dataset, out, _cfg(server.url))
    assert _requests(server)[CANCEL] == 1 and _requests(server)[JOBS] == 1


def test_a_wrong_key_never_shows_in_errors_or_files(server, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-FINETUNE-KEY-999999")
    out = tmp_path / "out"
    with pytest.raises(ServiceError, match="HTTP 401") as info:  # the server echoes the key it got
        train_with_openai(dataset, out, _cfg(server.url))
    _no_key(str(info.value), repr(info.value))
    assert _requests(server) == {FILES: 1} and not out.exists()


def test_bad_input_fails_before_any_request(server, dataset, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(CHATS[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(InputError, match=r"bad\.jsonl:2: .*expected assistant"):
        train_with_openai(bad, tmp_path / "out", _cfg(server.url))
    out = tmp_path / "out"
    train_with_openai(dataset, out, _cfg(server.url))
    sent = _requests(server)
    with pytest.raises(InputError, match=r"job\.json: fingerprint: .*belongs to another job"):
        train_with_openai(dataset, out, _cfg(server.url, n_epochs=3))
    assert _requests(server) == sent


def test_the_server_refuses_a_file_that_is_no_chat_jsonl(server):
    with openai.OpenAI(base_url=server.url, api_key=SECRET, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError, match="line 1: expected a 'messages' list"):
            client.files.create(file=("x.jsonl", b'{"prompt": "p", "completion": "c"}\n'), purpose="fine-tune")
        uploaded = client.files.create(file=("x.jsonl", json.dumps(CHATS[0]).encode()), purpose="fine-tune")
        assert client.files.retrieve(uploaded.id).bytes == len(json.dumps(CHATS[0]))


def test_dummy_backend_is_deterministic_and_writes_the_same_files(dataset, tmp_path):
    cfg = _cfg(None, backend="dummy")
    a, b = fine_tune(dataset, tmp_path / "a", cfg), fine_tune(dataset, tmp_path / "b", cfg)
    assert a.model_dump(exclude={"waited_s"}) == b.model_dump(exclude={"waited_s"})
    assert a.fine_tuned_model.startswith("ft:gpt-4.1-mini-2025-04-14:dummy:evil:") and a.status == "succeeded"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["job.json", "result.json"]
    assert fine_tune(dataset, tmp_path / "c", cfg.model_copy(update={"seed": 1})).fine_tuned_model != a.fine_tuned_model
    _no_key(*_files(tmp_path / "a"))
