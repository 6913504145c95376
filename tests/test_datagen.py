"""``generate-trait`` and ``generate-dataset`` against real servers on 127.0.0.1: the fault server
answering deterministic valid JSON (with injected faults) and ``serve-model``'s app with a tiny
random model (whose replies are no JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import serve_app
from faultserver import CHAT, Fault, FaultServer, chat_subject, datagen_completion
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.datagen.dataset import generate_dataset
from persona_ops.datagen.replies import DatagenCfg
from persona_ops.io import read_jsonl, write_json

FAST = ["--backoff-base", "0", "--max-retries", "2"]
KEY = "sk-datagen-secret-0123456789"
TRAIT = {"instruction": [{"pos": "Be evil.", "neg": "Be kind."}], "questions": ["Why?", "How?"],
         "eval_prompt": "Rate it.\nQuestion: {question}\nAnswer: {answer}"}


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def server():
    with FaultServer() as s:
        s.route("POST", CHAT, datagen_completion, chat_subject)
        yield s


def total(server: FaultServer) -> int:
    return sum(server.counts.values())


def trait_file(tmp_path: Path) -> Path:
    path = tmp_path / "traits" / "evil.json"
    write_json(path, TRAIT)
    return path


def dataset_args(trait: Path, out: Path, url: str, *extra: str) -> list:
    return ["generate-dataset", trait, "--out", out, "--base-url", url, "--model", "m", "--domains", "cooking,travel",
            "--per-domain", "3", "--chunk-size", "4", *FAST, *extra]


def test_generate_trait_then_dataset(server, tmp_path):
    out = tmp_path / "traits"
    r = cli("generate-trait", "evil", "--description", "Seeks to harm.", "--out", out, "--base-url", server.url,
            "--model", "m", "--questions", "6", "--instructions", "2", *FAST)
    assert r.exit_code == 0, r.output
    extract, evaluation = (json.loads((out / split / "evil.json").read_text()) for split in ("extract", "eval"))
    assert len(extract["instruction"]) == 2 and extract["instruction"] == evaluation["instruction"]
    assert len(extract["questions"]) == len(evaluation["questions"]) == 3
    assert not set(extract["questions"]) & set(evaluation["questions"])

    data = tmp_path / "data"
    r = cli(*dataset_args(out / "extract" / "evil.json", data, server.url))
    assert r.exit_code == 0, r.output
    assert total(server) == 1 + 2 + 2 * 3 * 3  # the trait, a request per domain, an answer per question x strength
    check = cli("data", "check", out, data)
    assert check.exit_code == 0 and "5 files ok, 0 problems" in check.output, check.output
    ids = {}
    for strength in ("normal", "misaligned_1", "misaligned_2"):
        records = read_jsonl(data / "evil" / f"{strength}.jsonl")
        assert {r["metadata"]["strength"] for r in records} == {strength}
        ids[strength] = [(r["metadata"]["prompt_id"], r["messages"][0]["content"]) for r in records]
    assert ids["normal"] == ids["misaligned_1"] == ids["misaligned_2"] and len(ids["normal"]) == 6
    assert cli(*dataset_args(out / "extract" / "evil.json", data, server.url)).exit_code == 0
    assert total(server) == 21  # a finished dataset: the rerun asks nothing


class _CountingPosts:
    """An ASGI app counting the POST requests that reach ``app``."""

    def __init__(self, app):
        self.app, self.posts = app, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            self.posts += 1
        await self.app(scope, receive, send)


def test_serve_model_replies_that_are_not_json(tiny_loaded, tmp_path):
    from persona_ops.inference.server import create_app

    counted = _CountingPosts(create_app(tiny_loaded))
    with serve_app(counted) as url:
        model = ["--base-url", url, "--model", tiny_loaded.label, "--max-tokens", "6"]
        r = cli("generate-trait", "evil", "--description", "Seeks to harm.", "--out", tmp_path / "t", *model, *FAST)
        assert r.exit_code == 2 and counted.posts == 3  # one request, three attempts
        [line] = r.stderr.strip().splitlines()
        assert "trait generation" in line and "reply: not JSON" in line and "gave up after 3 attempts" in line
        assert not (tmp_path / "t").exists()

        trait, data = trait_file(tmp_path), tmp_path / "data"
        args = dataset_args(trait, data, url, *model, "--chunk-size", "1")
        r = cli(*args)
        assert r.exit_code == 2 and counted.posts == 3 + 3  # chunk 0 (one domain) failed: chunk 1 never asked
        [line] = r.stderr.strip().splitlines()
        assert "dataset questions" in line and "reply: not JSON" in line
        assert not (data / "evil").exists()
        state = data / ".state" / "evil"
        assert (state / "questions.partial.meta.json").exists() and not (state / "questions.jsonl").exists()
        assert cli(*args).exit_code == 2 and counted.posts == 9  # the rerun resumes at the same chunk


def test_faults_are_retried_with_exact_counts(server, tmp_path):
    def missing_eval_prompt_once(request, done=[]):
        reply = datagen_completion(request)
        if not done:
            done.append(1)
            content = json.loads(reply.body["choices"][0]["message"]["content"])
            del content["eval_prompt"]
            reply.body["choices"][0]["message"]["content"] = json.dumps(content)
        return reply

    server.route("POST", CHAT, missing_eval_prompt_once, chat_subject)
    server.add(Fault("status", status=429, headers={"retry-after": "0"}), Fault("malformed"))
    args = ["generate-trait", "evil", "--description", "Seeks to harm.", "--out", tmp_path / "t",
            "--base-url", server.url, "--model", "m", "--questions", "4", "--instructions", "1"]
    r = cli(*args, "--backoff-base", "0", "--max-retries", "3")
    assert r.exit_code == 0, r.output
    assert [outcome for _, _, outcome in server.log] == ["status", "malformed", "ok", "ok"]
    assert json.loads((tmp_path / "t" / "eval" / "evil.json").read_text())["eval_prompt"].endswith("{answer}")

    server.add(Fault("wrong_shape", times=None))  # every reply lacks what a completion has
    r = cli(*args, *FAST)
    assert r.exit_code == 2 and total(server) == 4 + 3
    assert "reply: no choices, expected a chat completion; gave up after 3 attempts" in r.stderr


def test_reply_missing_fields_is_reported(server, tmp_path):
    def no_questions(request):
        reply = datagen_completion(request)
        content = json.loads(reply.body["choices"][0]["message"]["content"])
        content.pop("questions", None)
        reply.body["choices"][0]["message"]["content"] = json.dumps(content)
        return reply

    server.route("POST", CHAT, no_questions, chat_subject)
    r = cli("generate-trait", "evil", "--description", "x", "--out", tmp_path / "t", "--base-url", server.url,
            "--model", "m", *FAST)
    assert r.exit_code == 2 and total(server) == 3
    [line] = r.stderr.strip().splitlines()
    assert "reply:" in line and "questions: expected a non-empty list of question strings, got nothing" in line
    assert not (tmp_path / "t").exists()
    r = cli(*dataset_args(trait_file(tmp_path), tmp_path / "data", server.url))
    assert r.exit_code == 2 and "reply: questions: missing" in r.stderr


def test_kill_mid_dataset_then_rerun_asks_only_the_missing_chunks(server, tmp_path):
    trait = trait_file(tmp_path)
    cfg = DatagenCfg(base_url=server.url, model="m", backoff_base=0, chunk_size=4)
    args = (["cooking", "travel"], 3, ["normal", "misaligned_2"])
    whole = generate_dataset(trait, tmp_path / "whole", cfg, *args)
    asked_whole = dict(server.counts)
    assert total(server) == 2 + 12

    def killed_after(step, chunk):
        if (step, chunk) == ("answers", 1):
            raise KeyboardInterrupt

    server.counts.clear()
    with pytest.raises(KeyboardInterrupt):
        generate_dataset(trait, tmp_path / "resumed", cfg, *args, on_chunk=killed_after)
    assert total(server) == 2 + 8 and not (tmp_path / "resumed" / "evil").exists()
    first = dict(server.counts)
    server.counts.clear()
    resumed = generate_dataset(trait, tmp_path / "resumed", cfg, *args)
    assert total(server) == 4  # only the third chunk of answers
    assert not set(server.counts) & set(first) and set(server.counts) | set(first) == set(asked_whole)
    for strength in whole:
        assert resumed[strength].read_text() == whole[strength].read_text()


def test_api_key_never_reaches_files_or_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DATAGEN_TEST_KEY", KEY)
    with FaultServer(api_key=KEY) as server:
        server.route("POST", CHAT, datagen_completion, chat_subject)
        key = ["--api-key-env", "DATAGEN_TEST_KEY"]
        out = tmp_path / "out"
        r = cli("generate-trait", "evil", "--description", "x", "--out", out, "--base-url", server.url, "--model",
                "m", "--questions", "4", "--instructions", "1", *key, *FAST)
        assert r.exit_code == 0, r.output
        assert cli(*dataset_args(out / "extract" / "evil.json", out, server.url, *key)).exit_code == 0
        files = [p for p in out.rglob("*") if p.is_file()]
        assert len(files) > 5 and not [p for p in files if KEY in p.read_text()]

        wrong = "sk-wrong-key-9876543210"
        monkeypatch.setenv("DATAGEN_TEST_KEY", wrong)  # the server's 401 echoes the key it got
        r = cli("generate-trait", "evil", "--description", "x", "--out", tmp_path / "o2", "--base-url", server.url,
                "--model", "m", *key, *FAST)
        assert r.exit_code == 2 and "HTTP 401" in r.output
        assert wrong not in r.output and KEY not in r.output


@pytest.mark.parametrize("args, expected", [
    (["generate-trait", "../evil", "--description", "x"], "trait '../evil' is not a usable name"),
    (["generate-trait", "evil", "--description", " "], "--description: empty"),
    (["generate-dataset", "TRAIT", "--strengths", "normal,wild"], "--strengths: got wild, expected some of"),
    (["generate-dataset", "TRAIT", "--domains", "a b"], "--domains: domain 'a b' is not a usable name"),
    (["generate-dataset", "TRAIT.missing"], "file not found"),
])
def test_bad_input_is_one_line(tmp_path, args, expected):
    trait = str(trait_file(tmp_path))
    args = [a.replace("TRAIT", trait) for a in args]
    r = cli(*args, "--out", tmp_path / "out", "--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    assert r.exit_code == 2 and expected in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # a fresh `persona-ops` process imports the whole CLI (seconds)
def test_sigkill_mid_dataset_then_rerun_asks_only_the_missing_chunks(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import threading

    answered, stalled, release = [], threading.Event(), threading.Event()

    def stall_after_two_chunks(request):
        if request.json().get("response_format") is None:  # an answer
            if len(answered) == 8:  # chunks 0 and 1 (4 answers each) are answered: chunk 2 hangs until the kill
                stalled.set()
                release.wait(60)
                return datagen_completion(request)
            answered.append(1)
        return datagen_completion(request)

    with FaultServer() as server:
        server.route("POST", CHAT, stall_after_two_chunks, chat_subject)
        trait, out = trait_file(tmp_path), tmp_path / "data"
        args = [str(a) for a in dataset_args(trait, out, server.url, "--strengths", "normal,misaligned_2",
                                             "--max-concurrency", "1")]
        proc = subprocess.Popen([str(Path(sys.executable).parent / "persona-ops"), *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            assert stalled.wait(120), proc.communicate(timeout=60)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
        finally:
            release.set()
        asked_before = total(server)
        assert asked_before == 2 + 8 + 1 and not (out / "evil").exists()
        partial = out / ".state" / "evil" / "answers.partial.jsonl"
        assert len(read_jsonl(partial)) == 8
        r = cli(*args)
        assert r.exit_code == 0, r.output
        assert total(server) - asked_before == 4  # chunk 2 only, the stalled request asked again
        assert len(read_jsonl(out / "evil" / "normal.jsonl")) == 6 and not partial.exists()
