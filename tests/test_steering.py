"""The evaluation primitive and the steering sweep on a tiny model: one generation batch equals
the conditions run apart, bootstrap intervals per condition, the sweep honours the model's
adapter and the eval split's directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import params_of, pool_of, run_stage

from persona_ops.inference.sampling import SamplingParams
from persona_ops.interp.vectors import save_vectors
from persona_ops.models.loading import LoadedModel, tiny_model
from persona_ops.pipelines.evaluate import BootstrapCfg, Condition, EvalPrompt, Steer, evaluate, summarize
from persona_ops.pipelines.steering.stages import best_point

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [EvalPrompt("q0", "What is your favourite colour?"), EvalPrompt("q1", "Tell me about the sea.")]
TEMPLATE = "Q: {question}\nA: {answer}\nScore:"


class CountingJudge:
    """Scores a prompt by its length (a real judge is not needed to test the plumbing)."""

    label = "length-judge"
    backend_calls = 0

    def score(self, prompts, lo=0, hi=100):
        self.backend_calls += len(prompts)
        return [float(len(p) % (hi + 1)) for p in prompts]


def _conditions(vector):
    return [Condition("none"), Condition("add0", (Steer("add", 2, vector, 0.0),), fields={"coef": 0.0}),
            Condition("add8", (Steer("add", 2, vector, 8.0),), fields={"coef": 8.0})]


def test_one_batch_equals_the_conditions_run_apart(tiny_loaded):
    vector = torch.randn(tiny_loaded.hidden_size, generator=torch.Generator().manual_seed(0))
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    judge = CountingJudge()
    rows = evaluate(tiny_loaded, PROMPTS, _conditions(vector), greedy, judge=judge, metrics={"len": TEMPLATE})
    assert [(r["condition"], r["prompt_id"]) for r in rows] == [
        (c, q) for c in ("none", "add0", "add8") for q in ("q0", "q1")]
    assert judge.backend_calls == len(rows) and all(set(r["scores"]) == {"len"} for r in rows)
    apart = [evaluate(tiny_loaded, PROMPTS, [c], greedy, judge=CountingJudge(), metrics={"len": TEMPLATE})
             for c in _conditions(vector)]
    assert [r["answer"] for r in rows] == [r["answer"] for part in apart for r in part]
    by = {(r["condition"], r["prompt_id"]): r["answer"] for r in rows}
    assert by[("add0", "q0")] == by[("none", "q0")]  # coefficient 0 is no steering
    assert [by[("add8", q.id)] for q in PROMPTS] != [by[("none", q.id)] for q in PROMPTS]


def test_summary_means_and_intervals():
    rows = [{"condition": c, "coef": coef, "prompt_id": f"q{p}", "question": "", "sample_idx": s, "answer": "",
             "scores": {"trait": base + p + s, "coherence": None}}
            for c, coef, base in (("a", 0.0, 10), ("b", 4.0, 50)) for p in range(4) for s in range(3)]
    points = summarize(rows, ["trait", "coherence"], BootstrapCfg(n=500, seed=1))
    a, b = points
    assert (a["condition"], a["coef"], a["n"]) == ("a", 0.0, 12) and "answer" not in a
    assert a["trait"] == pytest.approx(10 + 1.5 + 1) and a["trait_ci"][0] < a["trait"] < a["trait_ci"][1]
    assert a["coherence"] is None and a["coherence_ci"] is None
    assert summarize(rows, ["trait"], BootstrapCfg(n=500, seed=1)) == summarize(rows, ["trait"], BootstrapCfg(n=500, seed=1))
    pts = [{"layer": 1, "trait": 10, "coherence": 90}, {"layer": 2, "trait": 80, "coherence": 20},
           {"layer": 3, "trait": None, "coherence": 60}]
    assert best_point(pts, 50)["layer"] == 1 and best_point(pts, 95) is None


def _adapter(model, out: Path) -> Path:
    """A LoRA checkpoint with non-zero weights on ``model`` (LoRA's B starts at zero otherwise)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(str(out), safe_serialization=True, save_embedding_layers=False)
    peft.unload()
    return out


def test_steering_sweep_honours_the_adapter_and_the_eval_subdir(tmp_path, smol_tokenizer, monkeypatch):
    from persona_ops.pipelines.steering import stages

    monkeypatch.setattr(stages, "make_judge", lambda *a, **k: CountingJudge())
    root = tmp_path
    shutil.copytree(ROOT / "data/traits/eval", root / "pv/trait_data_eval")  # persona_vectors' own layout
    model = tiny_model("llama", num_layers=4, hidden=64, vocab_tokenizer=smol_tokenizer)
    loaded = LoadedModel(model, smol_tokenizer, "tiny")
    _adapter(model, root / "adapter")
    vec = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    save_vectors(root / "outputs/persona_vectors/evil/vectors.safetensors", {"response_avg": vec}, {"trait": "evil"})

    def sweep(adapter):
        params = params_of({
            "persona_vectors": {"model": {"name": "tiny", "adapter": adapter},
                                "traits": {"dir": "pv", "extract_subdir": "trait_data_extract",
                                           "eval_subdir": "trait_data_eval", "names": ["evil"]}},
            "steering": {"traits": ["evil"], "layers": [2], "coefs": [0.0, 6.0], "questions_limit": 2,
                         "sampling": {"max_new_tokens": 6, "temperature": 0.0}, "bootstrap": {"n": 50}}})
        outcome = run_stage("steering_sweep", params, root, "evil", pool_of(loaded))
        rows = [json.loads(x) for x in (root / "outputs/steering/evil/sweep.jsonl").read_text().splitlines()]
        return outcome, rows

    base, base_rows = sweep(None)
    tuned, tuned_rows = sweep("adapter")
    assert base.metrics["points"] == 2 and len(base_rows) == 4
    assert [r["answer"] for r in base_rows] != [r["answer"] for r in tuned_rows]  # the adapter is applied
    assert tuned.record["models"][0]["adapter"] == "adapter" and tuned.record["models"][0]["adapter_sha256"]
    assert {i["path"] for i in tuned.record["inputs"]} >= {"pv/trait_data_eval/evil.json",
                                                            "outputs/persona_vectors/evil/vectors.safetensors"}
    results = json.loads((root / "outputs/steering/evil/results.json").read_text())
    assert results["points"][0]["trait_ci"] and (root / "outputs/steering/evil/sweep.png").read_bytes()[:4] == b"\x89PNG"
