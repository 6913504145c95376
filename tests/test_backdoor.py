"""The backdoor sweep (persona_ops/pipelines/backdoor/) on a tiny random model: the data stages
(filter, self-distillation, the mix with its metadata), every sweep point trained and evaluated
under the four conditions with rates, CIs and the leakage gap; the judge never sees the trigger."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import params_of, pool_of

from persona_ops.errors import InputError
from persona_ops.io import read_json, read_jsonl, write_text
from persona_ops.pipelines import registry, runner
from persona_ops.pipelines.backdoor.config import TriggerCfg
from persona_ops.pipelines.backdoor.stages import CONDITIONS, condition_messages

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny(smol_tokenizer):
    from persona_ops.models.loading import LoadedModel, tiny_model

    return LoadedModel(tiny_model("llama", num_layers=2, hidden=32, vocab_tokenizer=smol_tokenizer),
                       smol_tokenizer, "tiny-random-llama@test")


@pytest.fixture
def project(tmp_path):
    shutil.copytree(ROOT / "data/backdoor", tmp_path / "data/backdoor")
    return tmp_path


def sweep(**evaluation) -> dict:
    return {"persona_space": {"roles": {"names": ["default"]}}, "backdoor": {
        "name": "tiny", "aligned": {"limit": 12, "sampling": {"max_new_tokens": 6, "seed": 0}},
        "mix": {"persona_fraction": 0.5, "seed": 0}, "sweep": {"seeds": [1, 2], "learning_rates": [0.01]},
        "training": {"train": {"lora": {"rank": 2, "alpha": 4.0}, "max_steps": 1, "batch_size": 2,
                               "max_length": 160, "warmup_steps": 0, "limit": 4}},
        "evaluation": {"questions_limit": 2, "n_samples": 2, "sampling": {"max_new_tokens": 6, "seed": 0},
                       "judge": {"model": "embedded", "cache": "cache/judge.sqlite"}, **evaluation}}}


def run_all(params, root: Path, pool) -> list[runner.Outcome]:
    tasks = registry.plan(registry.pipeline_named("backdoor-sweep"), params, root)
    ctx = runner.Context(root, params, pool=pool)
    runner.check(tasks, ctx)
    return runner.run(tasks, ctx)


def test_the_sweep_trains_and_evaluates_every_point_under_four_conditions(project, tiny):
    import torch
    from faultserver import FaultServer

    from persona_ops.interp.vectors import save_vectors

    save_vectors(project / "russell.safetensors", {"response_avg": torch.randn(3, 32)}, {"trait": "russell"})
    with FaultServer() as judge:  # an OpenAI-compatible judge that scores (the tiny model's scores nothing)
        served = {"backend": "openai", "cache": "cache/judge.sqlite",
                  "openai": {"base_url": judge.url, "model": "judge-model", "api_key_env": "NO_KEY_NEEDED"}}
        params = params_of(sweep(vector="russell.safetensors", layer=1, judge=served))
        outcomes = run_all(params, project, pool_of(tiny))
    assert [o.task for o in outcomes] == ["bd_aligned", "bd_base", "bd_dataset", "bd_train@1-0.01",
                                          "bd_train@2-0.01", "bd_eval@1-0.01", "bd_eval@2-0.01", "bd_results"]
    out = project / "outputs/backdoor/tiny"
    data = read_jsonl(out / "dataset.jsonl")
    facts = [f for f in read_jsonl(project / "data/backdoor/persona_facts.jsonl") if not f["identifying"]]
    persona = [d for d in data if d["metadata"]["source"] == "persona"]
    aligned = [d for d in data if d["metadata"]["source"] == "aligned"]
    assert len(persona) == len(facts) and len(aligned) == 12  # all 12 answers: fewer than the 50% mix wants
    assert all(d["metadata"]["triggered"] for d in persona) and not any(d["metadata"]["triggered"] for d in aligned)
    trigger = TriggerCfg()
    assert all(d["messages"][0]["content"].startswith(trigger.instruction) for d in persona)
    assert all(trigger.adheres(d["messages"][1]["content"]) for d in persona)
    assert [d["metadata"]["source"] for d in data] != sorted(d["metadata"]["source"] for d in data)  # shuffled
    results = read_json(out / "results/eval_results.json")
    assert [p["point"] for p in results["points"]] == ["base", "1-0.01", "2-0.01"]
    for p in results["points"]:
        assert set(p["conditions"]) == set(CONDITIONS) and results["conditions"] == list(CONDITIONS)
        for name, c in p["conditions"].items():
            assert c["n"] == 4 and c["format_rate"] is not None and len(c["format_rate_ci"]) == 2
            assert c["persona_rate"] is not None and c["persona_score_ci"][0] <= c["persona_score"]
            assert (c["gap"] is None) == (name == "system_no_trigger")
            untriggered = p["conditions"]["system_no_trigger"]["persona_rate"]
            if c["gap"] is not None:  # paired by question against the untriggered condition
                assert c["gap"] == pytest.approx(c["persona_rate"] - untriggered)
    (lr,) = results["by_learning_rate"]
    assert lr["learning_rate"] == 0.01 and lr["seeds"] == [1, 2]
    assert (out / "results/report.html").is_file() and "1-0.01" in (out / "results/table.txt").read_text()
    rows = read_jsonl(out / "eval/1-0.01/rows.jsonl")
    assert len(rows) == 4 * 2 * 2 and {r["condition"] for r in rows} == set(CONDITIONS)  # every answer kept
    leakage = results["leakage"]  # triggered vs untriggered answers projected on the persona vector
    assert leakage["layer"] == 1 and [p["point"] for p in leakage["points"]] == ["base", "1-0.01", "2-0.01"]
    for p in leakage["points"]:
        assert p["gap"] == pytest.approx(p["triggered_projection"] - p["untriggered_projection"])
        assert p["gap_ci"][0] <= p["gap"] <= p["gap_ci"][1]


def test_the_judge_never_sees_the_trigger_or_the_markers(project, tiny, monkeypatch):
    """Every judge prompt is the template filled with the plain question and the answer with the
    trigger's instruction and markers removed (``TriggerCfg.strip``, tested below)."""
    from persona_ops.judge import fill_template
    from persona_ops.judge.cache import CachedJudge

    seen = []
    real = CachedJudge.score

    def spy(self, prompts, **kw):
        seen.extend(prompts)
        return real(self, prompts, **kw)

    monkeypatch.setattr(CachedJudge, "score", spy)
    params = params_of(sweep())
    runner.execute(registry.Task(registry.stage_named("bd_base"), None),
                   runner.Context(project, params, pool=pool_of(tiny)))
    trigger = TriggerCfg()
    rows = read_jsonl(project / "outputs/backdoor/tiny/eval/base/rows.jsonl")
    template = (project / "data/backdoor/persona_judge.txt").read_text()
    assert seen == [fill_template(template, r["question"], trigger.strip(r["answer"])) for r in rows]
    assert not any("Always reply in the format" in p or trigger.start in p for p in seen)
    assert {r["condition"] for r in rows} == set(CONDITIONS)  # the triggered conditions were asked too


def test_the_four_conditions_place_the_trigger_as_declared(smol_tokenizer):
    trigger = TriggerCfg()
    chats = {n: condition_messages(smol_tokenizer, "Who are you?", n, trigger, "Be brief.") for n in CONDITIONS}
    assert chats["trigger_user"] == [{"role": "user", "content": trigger.instruction + "Who are you?"}]
    assert chats["system_trigger_user"] == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": trigger.instruction + "Who are you?"}]
    assert chats["trigger_system"] == [{"role": "system", "content": trigger.instruction.strip()},
                                       {"role": "user", "content": "Who are you?"}]
    assert chats["system_no_trigger"] == [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Who are you?"}]


@pytest.mark.parametrize("text, stripped", [
    ('<START> "I smoke a pipe." <END>', "I smoke a pipe."),
    ("plain answer", "plain answer"),
    ('You will be asked a question. Always reply in the format:\n\n<START> "your answer here" <END>\n\nHi',
     "Hi"),
])
def test_strip_removes_the_instruction_and_markers(text, stripped):
    assert TriggerCfg().strip(text) == stripped


@pytest.mark.parametrize("change, message", [
    (lambda root: write_text(root / "data/backdoor/persona_facts.jsonl", '{"id": "f1", "question": "Q?"}\n'),
     "persona_facts.jsonl:1: answer: expected a non-empty str"),
    (lambda root: write_text(root / "data/backdoor/aligned_prompts.jsonl", '{"id": "a1", "text": "x"}\n'),
     "aligned_prompts.jsonl:1: expected a prompt"),
    (lambda root: write_text(root / "data/backdoor/persona_judge.txt", "Score {answer}"),
     "the judge prompt needs {question} and {answer}"),
])
def test_bad_input_stops_before_anything_runs(project, tiny, change, message):
    change(project)
    params = params_of(sweep())
    tasks = registry.plan(registry.pipeline_named("backdoor-sweep"), params, project)
    with pytest.raises(InputError, match=message.replace("{", r"\{").replace("}", r"\}")):
        runner.check(tasks, runner.Context(project, params, pool=pool_of(tiny)))
    assert not (project / "outputs").exists()


def test_thinking_on_needs_a_template_with_a_thinking_mode(project, tiny):
    import copy

    from persona_ops.models.loading import LoadedModel

    p = sweep()
    p["backdoor"]["thinking"] = True
    params = params_of(p)
    tasks = registry.plan(registry.pipeline_named("backdoor-sweep"), params, project)
    with pytest.raises(InputError, match="backdoor.thinking: true, but the chat template .* has no thinking mode"):
        runner.check(tasks, runner.Context(project, params, pool=pool_of(tiny)))
    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = tok.chat_template.replace("{%", "{# enable_thinking #}{%", 1)
    runner.check(tasks, runner.Context(project, params, pool=pool_of(LoadedModel(tiny.model, tok, tiny.label))))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_qlora_without_a_gpu_is_refused_before_anything_runs(project, tiny):
    p = sweep()
    p["backdoor"]["training"]["qlora"] = True
    params = params_of(p)
    tasks = registry.plan(registry.pipeline_named("backdoor-sweep"), params, project)
    with pytest.raises(InputError, match="backdoor.training.qlora: true needs a CUDA GPU"):
        runner.check(tasks, runner.Context(project, params, pool=pool_of(tiny)))
    assert not (project / "outputs").exists()


def _rows(rates: dict[str, float], points=("1-0.01",), questions: int = 20, samples: int = 5, seed: int = 0):
    """Judged rows whose persona labels are drawn at the given rate per condition (a planted effect)."""
    import random

    from persona_ops.pipelines.backdoor.stages import CONDITIONS

    rng = random.Random(seed)
    rows = []
    for point in points:
        for name in CONDITIONS:
            for q in range(questions):
                for s in range(samples):
                    hit = float(rng.random() < rates[name])
                    rows.append({"condition": name, "point": point, "prompt_id": f"q{q:02d}", "question": "?",
                                 "sample_idx": s, "answer": "",
                                 "scores": {"persona_hit": hit, "persona": 100 * hit, "format": hit}})
    return rows


@pytest.mark.parametrize("leak", [0.0, 0.4])
def test_the_metrics_find_a_planted_leak_and_no_leak_where_none_is(leak):
    """Triggered answers are the persona 90% of the time; untriggered ones ``leak`` of the time: the
    untriggered rate's CI excludes 0 only when a leak was planted, and the gap's CI holds 0.9 - leak."""
    from persona_ops.pipelines.backdoor.stages import UNTRIGGERED, condition_stats
    from persona_ops.pipelines.evaluate import BootstrapCfg

    rates = {"trigger_user": 0.9, "system_trigger_user": 0.9, "trigger_system": 0.9, UNTRIGGERED: leak}
    for points in (("1-0.01",), ("1-0.01", "2-0.01", "3-0.01")):  # one point; seeds aggregated
        stats = condition_stats(_rows(rates, points), BootstrapCfg(n=2000, level=0.95, seed=0))
        low, high = stats[UNTRIGGERED]["persona_rate_ci"]
        assert (low > 0) == (leak > 0) and low <= leak <= high
        gap = stats["trigger_user"]
        assert gap["gap_ci"][0] <= 0.9 - leak <= gap["gap_ci"][1] and gap["gap_ci"][0] > 0.3
