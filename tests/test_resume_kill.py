"""SIGKILL at random points of the stages that resume: a stage process is killed again and again
while it writes, then run to the end; the result equals an uninterrupted run's byte for byte
(0 records lost, 0 duplicated), and no torn or partial output file is ever visible."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
DATA = TESTS.parent / "data"

# The stage in its own process: a tiny random model (the same weights in every process), each
# generation call slowed down so that kills land while chunks are being made.
CHILD = """
import json, sys, time
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from conftest import params_of, pool_of, run_stage
from persona_ops.inference import backends
from persona_ops.models.loading import LoadedModel, embedded_model_dir, prepare_tokenizer, tiny_model
from transformers import AutoTokenizer

original = backends.HFGenerator.generate
def slow(self, *args, **kwargs):
    time.sleep(0.15)
    return original(self, *args, **kwargs)
backends.HFGenerator.generate = slow
tok = prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_model_dir()))
loaded = LoadedModel(tiny_model("llama", num_layers=2, hidden=32, vocab_tokenizer=tok), tok, "tiny@kill-test")
root, stage, item, params = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
run_stage(stage, params_of(params), root, item, pool_of(loaded))
"""

CASES = {
    "role_transcripts": ("pirate", "outputs/persona_space/transcripts/pirate.jsonl", {"persona_space": {
        "roles": {"dir": "roles/instructions", "questions": "roles/questions.jsonl", "names": ["default", "pirate"],
                  "instructions_limit": 2, "questions_limit": 3},
        "transcripts": {"rollouts": 2, "chunk_size": 2, "batch_size": 2, "sampling": {"max_new_tokens": 4}}}}),
    "generate": ("evil", "outputs/persona_vectors/evil/generations.jsonl", {"persona_vectors": {
        "traits": {"dir": "traits", "names": ["evil"]},
        "generate": {"n_per_question": 2, "questions_limit": 2, "chunk_size": 3, "batch_size": 3,
                     "sampling": {"max_new_tokens": 4}}}}),
}


def _project(root: Path) -> Path:
    shutil.copytree(DATA / "roles", root / "roles")
    shutil.copytree(DATA / "traits", root / "traits")
    return root


def _start(root: Path, stage: str, item: str, params: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD.format(tests=str(TESTS)), str(root), stage, item,
                             json.dumps(params)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("stage", sorted(CASES))
def test_sigkilled_stage_resumes_to_the_uninterrupted_result(tmp_path, stage):
    item, out, params = CASES[stage]
    reference = _project(tmp_path / "reference")
    child = _start(reference, stage, item, params)
    assert child.wait(timeout=300) == 0, child.stderr.read()
    expected = (reference / out).read_bytes()
    records = [json.loads(x) for x in expected.decode().splitlines()]

    root = _project(tmp_path / "killed")
    final, partial = root / out, (root / out).with_suffix(".partial.jsonl")
    rng = random.Random(stage)
    kills = 0
    for target in sorted(rng.sample(range(1, len(records) - 1), 3)):  # kill once the partial file holds >= target
        child = _start(root, stage, item, params)
        while _lines(partial) < target and child.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.15))  # anywhere in the chunk being made
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        kills += child.returncode == -signal.SIGKILL
        assert not final.exists() or final.read_bytes() == expected  # never torn, never partial
    assert kills >= 2  # the kills landed while the stage was working
    child = _start(root, stage, item, params)
    assert child.wait(timeout=300) == 0, child.stderr.read()
    assert final.read_bytes() == expected
    ids = [json.dumps({k: r[k] for k in sorted(r) if k not in ("response", "answer")}) for r in
           map(json.loads, final.read_text().splitlines())]
    assert len(ids) == len(set(ids)) == len(records)  # 0 lost, 0 duplicated
    assert not list(final.parent.glob("*.partial*"))
