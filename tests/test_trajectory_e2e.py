"""End to end on the embedded model: the `trajectory` Prefect flow (under the test harness) in a
temporary repo with a tiny configuration - LoRA fine-tune, role stages per role, persona space,
checkpoint activations, trajectory report - in one process with the model loaded once; then
MLflow holds the space and the adapter, the checkpoint runs carry their checkpoint's model,
the trajectory's lineage is one graph back to the role files, `dvc repro` has nothing left to
do, and a new role or a changed role file reruns only that role's stages."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, run_dvc

ROOT = Path(__file__).resolve().parents[1]
ROLES = ["default", "pirate", "therapist", "zen_monk"]
TARGETS = ("trajectory", "capping")
pytestmark = pytest.mark.slow


def _dvc(project: Path, *args: str):
    return run_dvc(project, *args, env={"MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"})


def _changed(project: Path) -> set[str]:
    out = _dvc(project, "status", "--json", "--with-deps", *TARGETS)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout or "{}"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project with 3 roles + default in their own directory (``roles.names``
    null: the flow writes the list into params.yaml) and a 4-step fine-tune."""
    proj = tmp_path_factory.mktemp("traj")
    copy_project(proj)
    (proj / "roles").mkdir()
    for name in ROLES:
        shutil.copy(ROOT / "data/roles/instructions" / f"{name}.json", proj / "roles")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["finetune"]["train"].update(max_steps=4, save_every=2, limit=8)
    ps = params["persona_space"]
    ps["roles"].update(dir="roles", names=None, instructions_limit=1, questions_limit=2)
    ps["transcripts"]["sampling"]["max_new_tokens"] = 12
    ps["trajectory"]["checkpoints"] = {
        "base": {"step": 0, "model": {"name": "embedded", "adapter": None}},
        "step-2": {"step": 2, "model": {"name": "embedded", "adapter": {"stage": "finetune", "checkpoint": 2}}},
        "step-4": {"step": 4, "model": {"name": "embedded", "adapter": {"stage": "finetune", "checkpoint": 4}}}}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def flow_result(project, tmp_path_factory):
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipelines import persona_space, trajectory

    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"
    try:
        with prefect_test_harness(server_startup_timeout=120):
            result = trajectory(root=str(project), params=None)
            # the persona-space pipeline afterwards: only its capping stage is left to run
            return {**result, "persona-space": persona_space(root=str(project), params=None)}
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _client(project):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_flow_runs_every_role_with_one_model_load(project, flow_result):
    names = yaml.safe_load((project / "params.yaml").read_text())["persona_space"]["roles"]["names"]
    assert names == ROLES  # null was written out as the list DVC's foreach runs over
    stages = flow_result["stages"]
    for stage in ("role_transcripts", "role_judge", "role_activations"):
        assert all(stages[f"{stage}@{r}"] == "ran" for r in ROLES), stages
    assert stages["finetune"] == "ran" and stages["checkpoint_activations@step-2"] == "ran"
    assert list(stages)[0] == "finetune" and list(stages)[-1] == "trajectory"
    # fine-tune, reference transcripts, judge, captures and every checkpoint share one base model
    assert flow_result["model_loads"] == 1
    base = project / "outputs/persona_space"
    assert sorted(p.name for p in (base / "activations").glob("*.safetensors")) == sorted(
        f"{r}_activations.safetensors" for r in ROLES)
    assert (base / "scores/default.scores.jsonl").read_text() == ""


def test_trajectory_outputs(project, flow_result):
    base = project / "outputs/persona_space"
    records = [json.loads(line) for line in (base / "trajectory/trajectory.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == ["base", "step-2", "step-4"]
    for png in ("pc_scatter.png", "axis_projection.png", "pc_coordinates.png", "default_path.png"):
        assert (base / "trajectory" / png).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((base / "persona_space.metrics.json").read_text())
    assert metrics["n_roles"] == 3 and len(metrics["axis_pc1_cos_per_layer"]) == 31
    # step-4 is the reference model: replaying its own transcripts gives the reference axis back
    assert records[-1]["axis_cos_reference"] == pytest.approx(1.0, abs=1e-4)
    assert records[0]["axis_cos_reference"] < 1.0 - 1e-6
    manifest = json.loads((project / "outputs/finetune/pirate/manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]
    from persona_ops.interp.capping import load_capping

    ran = {k for k, v in flow_result["persona-space"]["stages"].items() if v == "ran"}
    assert ran == {"capping"} and flow_result["persona-space"]["model_loads"] == 0
    spec = load_capping(base / "capping.safetensors")
    summary = json.loads((base / "capping.json").read_text())
    assert spec.layers == [22, 23, 24, 25] and spec.vectors.shape == (4, 576)
    n_default = len(json.loads((base / "activations/default_metadata.json").read_text()))
    assert summary["n_default_samples"] == n_default >= 1 and set(summary["layers"]) == {"22", "23", "24", "25"}


def test_registry_runs_and_nothing_left_to_do(project, flow_result):
    from persona_ops.tracking.runs import children

    client = _client(project)
    space = client.get_model_version_by_alias("persona-space-smollm2-135m-instruct-pirate", "candidate")
    adapter = client.get_model_version_by_alias("lora-adapter-pirate", "candidate")
    capping = client.get_model_version_by_alias("capping-spec-smollm2-135m-instruct-pirate", "candidate")
    assert capping.tags["kind"] == "capping-spec" and capping.tags["dvc_md5"]
    assert "+outputs/finetune/pirate/checkpoint-4#" in space.tags["model"] and space.tags["kind"] == "persona-space"
    assert adapter.tags["source.path"] == "outputs/finetune/pirate/checkpoint-4" and adapter.tags["sha256"]
    runs = {r.info.run_name: r for r in children(flow_result["pipeline_run_id"])}
    assert "+outputs/finetune/pirate/checkpoint-2#" in runs["checkpoint_activations@step-2"].data.tags["model"]
    assert "+" not in runs["checkpoint_activations@base"].data.tags["model"]  # each checkpoint's own model
    assert _changed(project) == set()
    again = _dvc(project, "repro", *TARGETS)
    assert again.returncode == 0 and "Running stage" not in again.stdout


def test_the_trajectory_is_one_lineage_graph(project, flow_result):
    from persona_ops.reports.lineage import render
    from persona_ops.tracking.lineage import graph_of

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"
    try:
        g = graph_of("outputs/persona_space/trajectory", project)
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    runs = {n["label"] for n in g["nodes"] if n["kind"] == "run"}
    assert {f"checkpoint_activations@{c}" for c in ("base", "step-2", "step-4")} <= runs
    assert {f"role_transcripts@{r}" for r in ROLES} <= runs and "finetune" in runs and "persona_space" in runs
    data = {n["label"] for n in g["nodes"] if n["kind"] == "data"}
    assert {f"roles/{r}.json" for r in ROLES} <= data and "data/finetune/pirate.jsonl" in data
    text = render(g, "text")
    assert text.splitlines()[1].startswith("artifact: outputs/persona_space/trajectory")


def test_a_new_role_or_role_file_reruns_only_that_role(project, flow_result):
    params_path, pirate = project / "params.yaml", project / "roles/pirate.json"
    saved_params, saved_pirate = params_path.read_text(), pirate.read_bytes()
    shutil.copy(ROOT / "data/roles/instructions/poet.json", project / "roles")
    params = yaml.safe_load(saved_params)
    params["persona_space"]["roles"]["names"].append("poet")
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    role_stages = {s for s in _changed(project) if s.startswith("role_")}
    assert role_stages == {"role_transcripts@poet", "role_judge@poet", "role_activations@poet"}
    assert "persona_space" in _changed(project)  # the space has a new role

    params_path.write_text(saved_params)
    pirate.write_bytes(saved_pirate + b"\n")
    assert _changed(project) == {"role_transcripts@pirate", "role_judge@pirate"}
    pirate.write_bytes(saved_pirate)
    assert _changed(project) == set()
