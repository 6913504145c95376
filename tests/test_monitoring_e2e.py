"""End to end on the embedded model: `persona-ops run steering-sweep`, then `persona-ops run
projection`, in a temporary git + DVC repo with a tiny configuration (1 trait, 2 layers x 2
coefficients, a 2-step LoRA fine-tune). Checks the sweep plot and best point, the projection
columns with the finetuning shift, the MLflow runs and registered models, and that `dvc repro`
of both pipelines has nothing left to do."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, run_dvc

ROOT = Path(__file__).resolve().parents[1]
LAYERS, COEFS = [10, 20], [0.0, 6.0]
TYPES = ["proj", "prompt_avg_proj", "prompt_last_proj", "cos_sim"]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = tmp_path_factory.mktemp("monitor")
    copy_project(proj)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pv = params["persona_vectors"]
    pv["traits"]["names"], pv["per_trait"] = ["evil"], {"evil": {}}
    pv["generate"]["questions_limit"] = 1
    pv["generate"]["sampling"]["max_new_tokens"] = 12
    params["steering"].update(traits=["evil"], layers=LAYERS, coefs=COEFS, kinds=["add"], questions_limit=1,
                              n_per_question=1, sampling={"max_new_tokens": 8}, coherence_min=0.0,
                              bootstrap={"n": 200})
    params["finetune"]["train"].update(max_steps=2, save_every=2, limit=8)
    params["projection"].update(
        inputs=[{"texts": "outputs/persona_vectors/evil/generations.jsonl",
                 "scores": "outputs/persona_vectors/evil/judgements.jsonl"}],
        vectors={"evil": "outputs/persona_vectors/evil/vectors.safetensors"}, layers=LAYERS, types=TYPES,
        model={"name": "embedded", "adapter": {"stage": "finetune", "checkpoint": "final"}},
        base_model={"name": "embedded"})
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


def _env(project: Path, tmp: Path) -> dict:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db", PREFECT_HOME=str(tmp),
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)  # Prefect's local ephemeral server
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def _run(project: Path, pipeline: str, env: dict) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "persona-ops"
    out = subprocess.run([str(cli), "run", pipeline, "--root", str(project)], cwd=project, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(project, tmp_path_factory):
    env = _env(project, tmp_path_factory.mktemp("prefect"))
    return _run(project, "steering-sweep", env), _run(project, "projection", env)


def _client(project: Path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _children(client, pipeline: str) -> dict[str, object]:
    """Stage runs nested under the newest pipeline run of ``pipeline``, by run name."""
    parent = client.search_runs([client.get_experiment_by_name(pipeline).experiment_id],
                                filter_string="tags.`persona_ops.entry` = 'prefect'",
                                order_by=["attributes.start_time DESC"], max_results=1)[0]
    experiments = [e.experiment_id for e in client.search_experiments()]
    kids = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    return {r.data.tags["mlflow.runName"]: r for r in kids}


def test_sweep_outputs_best_point_and_mlflow(project, runs):
    out = project / "outputs/steering/evil"
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    points = results["points"]
    assert sorted((p["kind"], p["layer"], p["coef"]) for p in points) == sorted(
        ("add", L, c) for L in LAYERS for c in COEFS)
    assert all(p["n"] == 1 for p in points)  # 1 question x 1 sample per point, all in one generation batch
    rows = [json.loads(x) for x in (out / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["answer"], str) and set(r["scores"]) == {"trait", "coherence"}
                                  for r in rows)
    assert len({r["question"] for r in rows}) == 1
    scored = [p for p in points if p["trait"] is not None]
    assert scored, "the judge scored no sweep point"
    assert all(p["trait_ci"][0] <= p["trait"] <= p["trait_ci"][1] for p in scored)
    best = results["best"]
    assert best["trait"] == max(p["trait"] for p in scored)
    metrics = json.loads((project / "metrics/steering_sweep/evil/steering_sweep.json").read_text())
    assert (metrics["best_layer"], metrics["best_coef"]) == (best["layer"], best["coef"])
    assert metrics["best_layer"] in LAYERS and metrics["best_coef"] in COEFS and metrics["points"] == 4

    client = _client(project)
    stages = _children(client, "steering-sweep")
    assert sorted(stages) == ["activations@evil", "generate@evil", "judge@evil", "steering_sweep@evil",
                              "vectors@evil"]
    sweep_run = stages["steering_sweep@evil"]
    assert sweep_run.data.metrics["best_layer"] == best["layer"]
    assert sweep_run.data.metrics["best_coef"] == pytest.approx(best["coef"])
    assert sweep_run.data.tags["model"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert any(k.startswith("dvc.") and k.endswith(".md5") for k in sweep_run.data.tags)
    assert client.get_model_version_by_alias("persona-vector-evil", "candidate").tags["sha256"]


def test_projection_columns_shift_and_mlflow(project, runs):
    generations = [json.loads(x) for x in
                   (project / "outputs/persona_vectors/evil/generations.jsonl").read_text().splitlines()]
    rows = [json.loads(x) for x in
            (project / "outputs/projections/evil-generations.projections.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [g["id"] for g in generations] and len(rows) == 10
    linear = [t for t in TYPES if t != "cos_sim"]
    expected = {"id"} | {f"evil_{t}_layer{L}" for t in TYPES for L in LAYERS} \
        | {f"evil_{t}_layer{L}_shift" for t in linear for L in LAYERS}
    assert set(rows[0]) == expected
    for r in rows:
        assert all(math.isfinite(v) for k, v in r.items() if k != "id")
        assert -1.0 <= r["evil_cos_sim_layer10"] <= 1.0
    # the 2-step adapter moves the activations: a finetuning shift, not all zero
    assert any(abs(r["evil_proj_layer20_shift"]) > 0 for r in rows)
    correlations = json.loads((project / "outputs/projections/correlations.json").read_text())
    assert correlations and all(-1.0 <= v <= 1.0 or math.isnan(v) for v in correlations.values())

    client = _client(project)
    stages = _children(client, "projection")
    assert sorted(stages) == ["finetune", "projection"]  # the persona-vector stages were up to date
    assert stages["projection"].data.metrics["inputs"] == 1
    assert "+outputs/finetune/pirate/checkpoint-2#" in stages["projection"].data.tags["model"]
    assert any(k.startswith("corr.evil-generations.") for k in correlations)
    assert client.get_model_version_by_alias("lora-adapter-pirate", "candidate").tags["sha256"]


def test_dvc_repro_afterwards_has_nothing_to_do(project, runs):
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"}
    status = run_dvc(project, "status", "--json", "steering_sweep", "projection", env=env)
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout + status.stderr
    out = run_dvc(project, "repro", "steering_sweep", "projection", env=env)
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout
