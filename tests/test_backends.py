"""Generation backends: ``openai`` against the project's own model server over real HTTP
(role transcripts with kill/resume, persona-vector answers), ``vllm`` missing, grouping."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import openai
import pytest
from conftest import params_of, pool_of, run_stage, serve_app

from persona_ops.chat import chat_messages
from persona_ops.errors import InputError
from persona_ops.inference.backends import EndpointCfg, GenerationCfg, _runs, make_generator
from persona_ops.inference.server import create_app
from persona_ops.models.refs import ModelRef
from persona_ops.pipelines.persona_space.roles import record_key
from persona_ops.resumable import chunk_seed

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-GENERATION-KEY-0123456789"
KEY_ENV = "PERSONA_OPS_TEST_GEN_KEY"


@pytest.fixture(scope="module")
def server(tiny_loaded):
    """The model server on the tiny model; records each chat request's auth header and body."""
    app = create_app(tiny_loaded, served_name="tiny-served")  # the id the clients name
    seen: list[dict] = []

    @app.middleware("http")
    async def record(request, call_next):
        if request.url.path.endswith("/chat/completions"):
            seen.append({"auth": request.headers.get("authorization"), "body": json.loads(await request.body())})
        return await call_next(request)

    with serve_app(app) as url:
        yield url, seen


def _openai_cfg(url: str, **kw) -> dict:
    return dict(base_url=url, model="tiny-served", api_key_env=KEY_ENV, max_concurrency=2, **kw)


def _roles_project(root: Path) -> Path:
    inst = root / "roles" / "instructions"
    inst.mkdir(parents=True)
    for name in ("default", "pirate"):
        shutil.copy(ROOT / "data/roles/instructions" / f"{name}.json", inst)
    shutil.copy(ROOT / "data/roles/questions.jsonl", root / "roles" / "questions.jsonl")
    return root


def _space_params(url: str):
    return params_of({"persona_space": {
        "roles": {"dir": "roles/instructions", "questions": "roles/questions.jsonl", "names": ["default", "pirate"],
                  "instructions_limit": 2, "questions_limit": 2, "model_name": "Tiny"},
        "transcripts": {"backend": "openai", "rollouts": 2, "chunk_size": 4, "openai": _openai_cfg(url),
                        "sampling": {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0}}}})


def _transcripts(params, root, pool, **kwargs) -> dict:
    """Both roles' transcripts; metrics summed."""
    out = {}
    for role in ("default", "pirate"):
        m = run_stage("role_transcripts", params, root, role, pool, **kwargs).metrics
        out = {k: out.get(k, 0) + v for k, v in m.items()}
    return out


def _texts(d: Path, suffix: str = "") -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(d.rglob(f"*{suffix}")) if p.is_file()}


class _Killed(Exception):
    pass


def test_openai_transcripts_resume_to_the_uninterrupted_result_without_leaking_the_key(
        server, tiny_loaded, tmp_path, monkeypatch, caplog):
    url, seen = server
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    params = _space_params(url)
    ref_root = _roles_project(tmp_path / "ref")
    seen.clear()
    ref = _transcripts(params, ref_root, pool_of(tiny_loaded))
    # 2 roles x 2 instructions x 2 questions, 2 rollouts each: one request per prompt with n=2
    assert ref["records"] == 16 and ref["generated"] == 16
    assert all(s["auth"] == f"Bearer {SECRET}" for s in seen)
    bodies = [s["body"] for s in seen]
    assert {(b["model"], b["n"], b["max_tokens"], b["temperature"]) for b in bodies} == {("tiny-served", 2, 4, 1.0)}
    assert len(bodies) == 8 and len({b["seed"] for b in bodies}) > 1
    d = ref_root / "outputs/persona_space/transcripts"
    recs = [json.loads(line) for line in (d / "pirate.jsonl").read_text().splitlines()]
    assert [record_key(r) for r in recs] == [(s, q, r) for s in range(2) for q in range(2) for r in range(2)]
    assert all(isinstance(r["response"], str) for r in recs)
    assert recs[0]["response"] != recs[1]["response"]  # two rollouts of one prompt
    prov = json.loads((d / "pirate.jsonl.prov.json").read_text())
    assert prov["models"][0]["label"] == f"openai:tiny-served@{url}"

    # killed after the first chunk of pirate, then resumed: the same files as the uninterrupted run
    root = _roles_project(tmp_path / "resumed")

    def kill(role, chunk):
        if role == "pirate":
            raise _Killed

    run_stage("role_transcripts", params, root, "default", pool_of(tiny_loaded))
    with pytest.raises(_Killed):
        run_stage("role_transcripts", params, root, "pirate", pool_of(tiny_loaded), on_chunk=kill)
    assert (root / "outputs/persona_space/transcripts/pirate.partial.jsonl").exists()
    resumed = _transcripts(params, root, pool_of(tiny_loaded))
    assert resumed["skipped"] == 1 and resumed["generated"] == 4  # default done; pirate's chunk 1
    assert _texts(root / "outputs", ".jsonl") == _texts(ref_root / "outputs", ".jsonl")
    assert sorted(_texts(root / "outputs", ".jsonl")) == ["default.jsonl", "pirate.jsonl"]

    everything = caplog.text + "".join(_texts(ref_root / "outputs").values())
    assert "GENERATION-KEY" not in everything
    assert KEY_ENV in json.dumps(prov)  # the variable's name is recorded, never its value


def test_openai_persona_vector_answers_are_the_servers_seeded_completions(server, tiny_loaded, tmp_path,
                                                                            monkeypatch):
    url, _ = server
    monkeypatch.setenv(KEY_ENV, SECRET)
    shutil.copytree(ROOT / "data/traits/extract", tmp_path / "data/traits/extract")
    params = params_of({"persona_vectors": {"traits": {"names": ["evil"]}, "generate": {
        "backend": "openai", "questions_limit": 1, "n_per_question": 2, "openai": _openai_cfg(url),
        "sampling": {"max_new_tokens": 5, "temperature": 0.9, "top_p": 0.95, "seed": 7}}}})
    res = run_stage("generate", params, tmp_path, "evil")
    out = tmp_path / "outputs/persona_vectors/evil/generations.jsonl"
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert res.metrics["generations"] == len(records) == 2 * 5 * 2  # polarities x instructions x samples
    # the first prompt's two samples: one request with n=2 and the first chunk's seed
    messages = chat_messages(tiny_loaded.tokenizer, records[0]["system"], records[0]["question"])
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as client:
        direct = client.chat.completions.create(model="tiny-served", messages=messages, n=2, temperature=0.9,
                                                top_p=0.95, max_tokens=5, seed=chunk_seed(7, "evil", 0))
    assert [r["answer"] for r in records[:2]] == [c.message.content.strip() for c in direct.choices]
    prov = (out.parent / "generations.jsonl.prov.json").read_text()
    assert json.loads(prov)["models"][0]["label"].startswith("openai:tiny-served@") and "GENERATION-KEY" not in prov


def test_openai_backend_needs_a_model_name_and_a_key_for_remote_servers(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    cfg = GenerationCfg(backend="openai", openai=EndpointCfg(base_url="http://127.0.0.1:9/v1"))
    with pytest.raises(InputError, match=r"generate\.openai\.model: the served model's name is required"):
        make_generator(cfg, ModelRef(), "generate")
    remote = GenerationCfg(backend="openai", openai=EndpointCfg(base_url="https://example.invalid/v1",
                                                                model="m", api_key_env=KEY_ENV))
    with pytest.raises(InputError, match=f"environment variable {KEY_ENV} \\(API key\\) is not set"):
        make_generator(remote, ModelRef(), "generate")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_without_vllm_is_a_clear_input_error(tmp_path):
    with pytest.raises(InputError, match=r"generate\.backend=vllm needs vLLM, which is not installed: "
                                         r"pip install 'persona-ops\[vllm\]'"):
        make_generator(GenerationCfg(backend="vllm"), ModelRef(), "generate")
    # through the stage: it fails before a model (or tokenizer) is loaded
    shutil.copytree(ROOT / "data/traits/extract", tmp_path / "data/traits/extract")
    params = params_of({"persona_vectors": {"model": {"name": str(tmp_path / "no-such-model")},
                                            "generate": {"backend": "vllm"}}})
    with pytest.raises(InputError, match="needs vLLM"):
        run_stage("generate", params, tmp_path, "evil")


def test_runs_group_consecutive_identical_chats():
    a, b = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
    assert _runs([a, a, a, b, a]) == [(0, 3), (3, 1), (4, 1)]
    assert _runs([a, a, a, b, b], max_n=2) == [(0, 2), (2, 1), (3, 2)]
    assert _runs([]) == []
