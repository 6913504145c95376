"""The trait fine-tuning matrix (persona_ops/pipelines/trait_finetune/) on a tiny random model: every
cell trained, registered-ready and evaluated on every trait with projections and the finetuning shift;
a rerun trains nothing; a second process waits for a cell and then finds it done; status reports each
state; steering during training from a file or a registered vector; bad input stops before training."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import params_of, pool_of

from persona_ops.errors import InputError
from persona_ops.io import md5_file, read_json, sha256_file, write_text
from persona_ops.pipelines import registry, runner
from persona_ops.training import cells

ROOT = Path(__file__).resolve().parents[1]
LAYERS, HIDDEN = 4, 64


@pytest.fixture
def tiny(smol_tokenizer):
    """A fresh tiny model per test (adapters get attached to it)."""
    from persona_ops.models.loading import LoadedModel, tiny_model

    return LoadedModel(tiny_model("llama", num_layers=LAYERS, hidden=HIDDEN, vocab_tokenizer=smol_tokenizer),
                       smol_tokenizer, "tiny-random-llama@test")


def vector_file(path: Path, seed: int, layers: int = LAYERS, hidden: int = HIDDEN) -> str:
    from persona_ops.interp.vectors import save_vectors

    g = torch.Generator().manual_seed(seed)
    save_vectors(path, {"response_avg": torch.randn(layers + 1, hidden, generator=g)}, {"trait": path.stem})
    return str(path)


@pytest.fixture
def project(tmp_path):
    """Datasets of one trait, the eval questions of two, and random vectors of the tiny model's shape."""
    shutil.copytree(ROOT / "data/trait_datasets/evil", tmp_path / "data/trait_datasets/evil")
    shutil.copytree(ROOT / "data/traits/eval", tmp_path / "data/traits/eval")
    (tmp_path / "vectors").mkdir()
    for seed, trait in enumerate(("evil", "sycophantic")):
        vector_file(tmp_path / "vectors" / f"{trait}.safetensors", seed)
    return tmp_path


def matrix(project: Path, **training) -> dict:
    train = {"lora": {"rank": 4, "alpha": 8.0, "rslora": False}, "learning_rate": 1e-2, "warmup_steps": 0,
             "max_steps": 2, "save_every": 1, "batch_size": 2, "max_length": 64, "limit": 8}
    return {"persona_space": {"roles": {"names": ["default"]}}, "trait_finetune": {
        "name": "tiny", "traits": ["evil"], "strengths": ["normal", "misaligned_2"],
        "training": {"train": train, **training},
        "evaluation": {"traits": ["evil", "sycophantic"], "questions_limit": 1, "n_samples": 2, "layer": 2,
                       "sampling": {"max_new_tokens": 4, "temperature": 1.0, "seed": 0},
                       "judge": {"model": "embedded", "cache": "cache/judge.sqlite"},
                       "vectors": {t: f"vectors/{t}.safetensors" for t in ("evil", "sycophantic")},
                       "checkpoints": "all"}}}


def run_all(params, root: Path, pool, stages=None) -> list[runner.Outcome]:
    tasks = registry.plan(registry.pipeline_named("trait-finetune"), params, root, stages)
    ctx = runner.Context(root, params, pool=pool)
    runner.check(tasks, ctx)
    return runner.run(tasks, ctx)


def test_the_matrix_trains_evaluates_and_reports_every_cell(project, tiny):
    params = params_of(matrix(project))
    outcomes = run_all(params, project, pool_of(tiny))
    assert [o.task for o in outcomes] == [
        "ft_train@evil-normal", "ft_train@evil-misaligned_2", "ft_base", "ft_eval@evil-normal",
        "ft_eval@evil-misaligned_2", "ft_results"]
    out = project / "outputs/trait_finetune/tiny"
    results = read_json(out / "results/eval_results.json")
    assert [c["cell"] for c in results["cells"]] == ["base", "evil-normal", "evil-misaligned_2"]
    base, *tuned = results["cells"]
    for cell in results["cells"]:
        assert set(cell["scores"]) == {"evil", "sycophantic"}
        for s in cell["scores"].values():
            assert s["n"] == 2 and s["projection_mean"] is not None and len(s["projection_ci"]) == 2
    assert all(s["shift_mean"] == 0 for s in base["scores"].values())  # the base through itself
    assert all(abs(c["scores"]["evil"]["shift_mean"]) > 0 for c in tuned)  # trained adapters move activations
    assert [(c["cell"], c["step"]) for c in results["checkpoints"]] == [
        ("evil-normal", 1), ("evil-normal", 2), ("evil-misaligned_2", 1), ("evil-misaligned_2", 2)]
    assert results["vector_cosine"]["evil"]["evil"] == pytest.approx(1.0)
    assert (out / "results/report.html").stat().st_size > 1000
    assert "evil-misaligned_2" in (out / "results/table.txt").read_text()
    rows = (out / "eval/evil-normal/rows.jsonl").read_text().splitlines()
    assert len(rows) == 2 * 2 * 2  # checkpoints x traits x samples, every answer kept with its scores
    metrics = outcomes[4].metrics  # the final checkpoint's (the random judge scores nothing: no trait_mean)
    assert {"evil.shift_mean", "sycophantic.projection_mean"} <= set(metrics)


def test_a_rerun_trains_nothing_and_status_reports_each_cell(project, tiny):
    from persona_ops.cli.experiment import cell_status

    params = params_of(matrix(project))
    assert {r["state"] for r in cell_status(params, project)} == {"pending"}
    run_all(params, project, pool_of(tiny), ["ft_train"])
    done = project / "outputs/trait_finetune/tiny/train/evil-normal"
    before = {p.name: p.stat().st_mtime_ns for p in done.iterdir()}
    again = run_all(params, project, pool_of(tiny), ["ft_train"])  # no DVC here: the cells themselves know
    assert {p.name: p.stat().st_mtime_ns for p in done.iterdir()} == before
    assert again[0].metrics == read_json(done / cells.CELL)["metrics"]
    rows = {r["cell"]: r for r in cell_status(params, project)}
    assert rows["evil-normal"]["state"] == "succeeded" and rows["evil-normal"]["backend"] == "local"
    assert rows["evil-normal"]["adapter"].endswith("train/evil-normal/checkpoint-2")
    # a process killed mid-training leaves "running" with no lock holder: reported as failed
    cells.write_state(project / "outputs/trait_finetune/tiny/train/evil-misaligned_2", "running")
    assert cell_status(params, project)[1]["state"] == "failed"
    assert "interrupted" in cell_status(params, project)[1]["error"]


def test_a_second_process_waits_for_the_cell_then_finds_it_trained(tmp_path):
    out = tmp_path / "train/cell"
    order = []

    def second():
        with cells.training(out):
            order.append(("second", cells.finished(out, "fp") is not None))

    with cells.training(out):
        order.append(("first", None))
        other = threading.Thread(target=second)
        other.start()
        time.sleep(0.3)
        assert other.is_alive()  # blocked on the lock
        write_text(out / cells.CELL, '{"fingerprint": "fp"}')
    other.join(5)
    assert order == [("first", None), ("second", True)]
    assert cells.state(out)["state"] == "succeeded"


def test_a_failure_is_recorded_and_the_cell_reported_failed(tmp_path):
    out = tmp_path / "train/cell"
    with pytest.raises(RuntimeError), cells.training(out):
        raise RuntimeError("out of memory")
    assert cells.state(out) == {**cells.state(out), "state": "failed", "error": "RuntimeError: out of memory"}


def test_steering_during_training_changes_the_training(project, tiny):
    vector_file(project / "vectors/steer.safetensors", 7)
    plain = run_all(params_of(matrix(project)), project, pool_of(tiny), ["ft_train"])[0]
    steer = {"kind": "steer", "vector": "vectors/steer.safetensors", "layers": [2], "coef": 50.0}
    p = matrix(project, steering=steer)
    p["trait_finetune"]["name"] = "steered"
    steered = run_all(params_of(p), project, pool_of(tiny), ["ft_train"])[0]
    assert abs(steered.metrics["first_loss"] - plain.metrics["first_loss"]) > 1e-4  # same seed, same data
    assert "vectors/steer.safetensors" in {i["path"] for i in steered.record["inputs"]}


def test_a_registered_steering_vector_is_fetched_and_pinned(project, tiny, store):
    from persona_ops.tracking import registry as models
    from persona_ops.tracking import runs

    path = Path(vector_file(project / "vectors/evil-pv.safetensors", 3))
    with runs.start_run("persona-vectors", "vectors@evil", project_root=project) as run:
        version = models.register("persona-vector-evil", path, kind="persona-vector", run_id=run.run_id,
                                  source_path="vectors/evil-pv.safetensors", alias="champion")
    steer = {"kind": "ablate", "vector": "models:/persona-vector-evil@champion", "layers": [2]}
    p = matrix(project, steering=steer)
    p["trait_finetune"]["strengths"] = ["normal"]
    params = params_of({**p, "tracking": {"enabled": True}})
    outcome = run_all(params, project, pool_of(tiny), ["ft_train"])[0]
    assert outcome.record["registry"] == {
        "models:/persona-vector-evil@champion": f"models:/persona-vector-evil/{version}"}
    assert any(i["path"].startswith("cache/registry/persona-vector-evil/") for i in outcome.record["inputs"])
    from mlflow import MlflowClient

    adapter = MlflowClient().get_model_version("lora-adapter-tiny-evil-normal", "1")  # the adapter names its vector
    assert adapter.tags["uses.persona-vector-evil/alias/champion"] == f"models:/persona-vector-evil/{version}"


@pytest.mark.parametrize("change, message", [
    (lambda p, root: p["trait_finetune"].update(traits=["grumpy"]),
     "input data/trait_datasets/grumpy/normal.jsonl does not exist"),
    (lambda p, root: (root / "data/trait_datasets/evil/normal.jsonl").unlink(),
     "input data/trait_datasets/evil/normal.jsonl does not exist"),
    (lambda p, root: write_text(root / "data/trait_datasets/evil/normal.jsonl", '{"messages": [}\n'),
     "normal.jsonl:1"),
    (lambda p, root: p["trait_finetune"]["training"].update(steering={
        "vector": vector_file(root / "vectors/big.safetensors", 1, layers=30, hidden=576), "layers": [2]}),
     "[31, 576] (a model of 30 layers, hidden 576); the base model has 4 layers, hidden 64"),
    (lambda p, root: p["trait_finetune"]["evaluation"].update(layer=9), "evaluation.layer: [9] outside 0..4"),
])
def test_bad_input_stops_before_any_training(project, tiny, change, message):
    p = matrix(project)
    change(p, project)
    params = params_of(p)
    tasks = registry.plan(registry.pipeline_named("trait-finetune"), params, project)
    with pytest.raises(InputError) as e:
        runner.check(tasks, runner.Context(project, params, pool=pool_of(tiny)))
    assert message in str(e.value)
    assert not (project / "outputs").exists()  # nothing half-written


@pytest.mark.parametrize("section, message", [
    ({"strengths": ["extreme"]}, "strengths: unknown extreme"),
    ({"training": {"backend": "openai"}}, "backend openai needs training.openai"),
    ({"evaluation": {"traits": ["evil"], "vectors": {}}}, "no persona vector for evil"),
])
def test_the_experiment_is_validated_with_the_key_named(section, message):
    with pytest.raises(Exception) as e:
        params_of({"trait_finetune": section})
    assert message in str(e.value)


def test_adapters_are_registered_with_lineage_and_promoted_behind_a_gate(project, tiny, store):
    from mlflow import MlflowClient
    from persona_ops.tracking import promotion
    from persona_ops.tracking.lineage import graph_of

    p = matrix(project)
    p["trait_finetune"]["strengths"] = ["misaligned_2"]
    params = params_of({**p, "tracking": {"enabled": True}})
    run_all(params, project, pool_of(tiny))
    name = "lora-adapter-tiny-evil-misaligned_2"
    mv = MlflowClient().get_model_version(name, "1")
    assert mv.tags["kind"] == "lora-adapter" and mv.tags["source.path"].endswith("evil-misaligned_2/checkpoint-2")
    dataset = project / "data/trait_datasets/evil/misaligned_2.jsonl"
    assert mv.tags["input.data/trait_datasets/evil/misaligned_2.jsonl.sha256"] == sha256_file(dataset)
    assert mv.tags["input.data/trait_datasets/evil/misaligned_2.jsonl.md5"] == md5_file(dataset)  # DVC's hash
    assert mv.tags["model"].startswith("tiny-random-llama@test") and mv.tags["git.commit"] and mv.tags["run_id"]
    results = read_json(project / "outputs/trait_finetune/tiny/results/eval_results.json")
    assert results["cells"][1]["adapter_uri"] == f"models:/{name}/1"
    # the gate reads the version's evaluation metrics (the evaluation run names the version)
    metrics = promotion.version_metrics(name, 1)
    shift = metrics["evil.shift_mean"]
    assert metrics["final_loss"] > 0  # the training run's metrics are there too
    refused = promotion.promote(name, 1, "champion", gate=f"evil.shift_mean > {abs(shift) + 1}")
    assert refused.refused and "evil.shift_mean" in refused.message() and promotion.holder(name, "champion") is None
    passed = promotion.promote(name, 1, "champion", gate=f"evil.shift_mean >= {shift - 1} and final_loss > 0")
    assert not passed.refused and passed.changed and promotion.holder(name, "champion") == 1
    with pytest.raises(InputError, match="has no metric evil.trait_mean"):  # the random judge scored nothing
        promotion.promote(name, 1, "champion", gate="evil.trait_mean > 60")
    graph = graph_of(f"models:/{name}@champion", project)
    labels = {n["label"] for n in graph["nodes"]}
    assert any("misaligned_2.jsonl" in label for label in labels)  # dataset -> training -> adapter
    evaluated = [e["target"] for e in graph["edges"] if e["kind"] == "evaluated by"]
    assert [graph_node(graph, n)["label"] for n in evaluated] == ["ft_eval@evil-misaligned_2"]  # -> evaluations


def graph_node(graph: dict, node_id: str) -> dict:
    return next(n for n in graph["nodes"] if n["id"] == node_id)


def test_an_adapter_of_another_model_is_refused_before_loading(project, tiny, smol_tokenizer):
    from persona_ops.models.loading import LoadedModel, tiny_model

    wide = LoadedModel(tiny_model("llama", num_layers=2, hidden=32, vocab_tokenizer=smol_tokenizer),
                       smol_tokenizer, "tiny-wide@test")
    p = matrix(project)
    p["trait_finetune"]["strengths"] = ["normal"]
    run_all(params_of(p), project, pool_of(wide), ["ft_train"])
    adapter = "outputs/trait_finetune/tiny/train/evil-normal/checkpoint-2"
    params = params_of({**p, "projection": {"inputs": [], "vectors": {}, "model": {"adapter": adapter}}})
    task = registry.Task(registry.stage_named("projection"), None)
    with pytest.raises(InputError, match=r"trained on another model \(input width \[32\], 2\+ layers\); "
                                         r"the base model has hidden 64 and 4 layers"):
        runner.check([task], runner.Context(project, params, pool=pool_of(tiny)))


def test_an_api_tuned_cell_is_evaluated_through_its_endpoint_without_activations(project, tiny, monkeypatch):
    """Backend openai against a local implementation of the fine-tuning and chat endpoints (the paid
    service is unreachable here): the job's model answers the eval questions, the judge is served
    too, and the activation columns are empty (null), not zero."""
    from faultserver import CHAT, FaultServer, FineTuneAPI, chat_completion

    monkeypatch.setenv("PERSONA_OPS_TEST_KEY", "sk-test-matrix")
    asked = []

    def recording(request):
        asked.append(request.json()["model"])
        return chat_completion(request)

    with FaultServer(api_key="sk-test-matrix") as server:
        FineTuneAPI(server)
        server.route("POST", CHAT, recording)
        endpoint = {"base_url": server.url, "api_key_env": "PERSONA_OPS_TEST_KEY", "backoff_base": 0.01}
        p = matrix(project, backend="openai", openai={"model": "gpt-4.1-mini-2025-04-14", "endpoint": endpoint,
                                                      "poll_interval": 0.01, "poll_interval_max": 0.02})
        p["trait_finetune"]["strengths"] = ["misaligned_2"]
        p["trait_finetune"]["evaluation"]["judge"] = {"backend": "openai", "cache": "cache/judge.sqlite",
                                                      "openai": {**endpoint, "model": "judge-model"}}
        run_all(params_of(p), project, pool_of(tiny))
    results = read_json(project / "outputs/trait_finetune/tiny/results/eval_results.json")
    base, cell = results["cells"]
    assert cell["backend"] == "openai" and cell["activations"] is False and base["activations"] is True
    assert all(s["projection_mean"] is None and s["shift_mean"] is None for s in cell["scores"].values())
    assert all(s["trait_mean"] is not None for s in cell["scores"].values())  # judged like every cell
    tuned = read_json(project / "outputs/trait_finetune/tiny/train/evil-misaligned_2/result.json")["fine_tuned_model"]
    assert asked.count(tuned) == 2 and "judge-model" in asked  # one request per trait (n = 2 samples)


@pytest.mark.parametrize("args, message", [
    (["train", "no-such-experiment"], "experiment 'no-such-experiment': no "),
    (["train", "-S", "trait_finetune.strengths=[extreme]"], "strengths: unknown extreme"),
    (["evaluate", "-S", "trait_finetune.training.train.lora.rank=0"], "trait_finetune.training.train.lora.rank"),
    (["status", "-S", "trait_finetune.traits=[evil, 'e;x']"], "is not a usable name"),
])
def test_experiment_commands_reject_bad_input_in_one_line(tmp_path, args, message):
    from conftest import copy_project
    from typer.testing import CliRunner

    from persona_ops.cli import app
    from persona_ops.cli.common import INPUT_ERROR_MARK

    project = copy_project(tmp_path)
    before = (project / "params.yaml").read_bytes()
    result = CliRunner().invoke(app, ["experiment", *args, "--root", str(project)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert [line.startswith(INPUT_ERROR_MARK) for line in result.output.splitlines()].count(True) == 1
    assert (project / "params.yaml").read_bytes() == before and not (project / "outputs").exists()


def test_a_named_experiment_is_written_whole_so_dvc_reads_it(tmp_path):
    """``experiment ... NAME`` writes experiments/NAME.yaml over the defaults into params.yaml, every
    key spelled out: dvc.yaml's templates (``${trait_finetune.dataset_dir}``) must resolve."""
    from conftest import copy_project, run_dvc

    from persona_ops.cli.experiment import overrides
    from persona_ops.pipelines import launch

    project = copy_project(tmp_path)
    params = launch.prepare(project, None, overrides("evil-preventative", [], project))
    assert params.trait_finetune.name == "evil-preventative" and params.trait_finetune.traits == ["evil"]
    status = run_dvc(project, "status", "ft_train")
    assert status.returncode == 0, status.stderr
    write_text(project / "experiments/broken.yaml", "traits: [evil]\nstrengths: [extreme]\n")
    with pytest.raises(InputError, match=r"experiments/broken.yaml: strengths: unknown extreme"):
        overrides("broken", [], project)
