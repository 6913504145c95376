"""The stage declarations and what is derived from them: dvc.yaml (code deps = the import
closure), items (named, never indexed; matrices), run plans, and the CLI's input errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, params_of, run_dvc
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.errors import InputError
from persona_ops.pipelines import registry
from persona_ops.pipelines.params import load_params
from persona_ops.pipelines.stage import Stage, stage

ROOT = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_generated_from_the_declarations():
    result = CliRunner().invoke(app, ["dvc-yaml", "--check", "--root", str(ROOT)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == registry.dvc_yaml(load_params(ROOT / "params.yaml"), ROOT)


def test_every_tracked_param_exists_in_params_yaml():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = load_params(ROOT / "params.yaml")
    for name, entry in registry.dvc_yaml(params, ROOT)["stages"].items():
        body = entry.get("do", entry)
        s = registry.STAGES[name]
        for item in registry.items(s, params, ROOT):
            for key in body["params"]:
                key = key.replace("${item}", item.name if item else "").replace("${key}", item.name if item else "")
                node = data
                for part in key.split("."):
                    assert part in node, f"{name}: params key {key} missing in params.yaml"
                    node = node[part]


def _closure(module: str) -> set[str]:
    import grimp

    graph = grimp.build_graph("persona_ops", cache_dir=None)  # no cache: edits within one second go unseen
    return {module} | set(graph.find_upstream_modules(module))


def test_code_deps_are_the_import_closure_of_the_stage_module():
    for s in registry.STAGES.values():
        deps = {d.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for d in registry.code_deps(s.module)}
        assert _closure(s.module) <= deps, s.name  # everything the module imports, at any depth
        parents = {".".join(m.split(".")[:i]) for m in deps for i in range(1, m.count(".") + 1)}
        assert deps <= set().union(*(_closure(m) for m in {s.module} | parents)), s.name  # and nothing else
    activations = registry.code_deps(registry.STAGES["activations"].module)
    assert "persona_ops/interp/vectors.py" in activations  # where the pair filter lives
    assert "persona_ops/pipelines/persona_vectors/stages.py" in activations


def test_editing_the_pair_filter_makes_dvc_report_the_activations_stages(tmp_path):
    project = copy_project(tmp_path)
    out = project / "outputs/persona_vectors/evil"
    out.mkdir(parents=True)
    for name in ("generations.jsonl", "judgements.jsonl", "activations.safetensors",
                 "activations.safetensors.prov.json"):
        (out / name).write_text("x\n")
    (project / "metrics/persona_vectors/evil").mkdir(parents=True)
    (project / "metrics/persona_vectors/evil/activations.json").write_text("{}\n")
    assert run_dvc(project, "commit", "-f", "activations@evil").returncode == 0
    assert json.loads(run_dvc(project, "status", "--json", "activations@evil").stdout or "{}") == {}
    with open(project / "persona_ops/interp/vectors.py", "a") as f:
        f.write("\n# a change to the module holding filter_pairs\n")
    status = json.loads(run_dvc(project, "status", "--json", "activations@evil").stdout)
    changed = status["activations@evil"][0]["changed deps"]
    assert changed == {"persona_ops/interp/vectors.py": "modified"}


def _fake(**kw) -> Stage:
    def fn(cfg, io):
        return {}
    fn.__module__ = "persona_ops.pipelines.stage"
    return stage("fake", pipeline="persona-vectors", params=[], outputs={"out": "outputs/fake/{item}.txt"}, **kw)(fn)


def test_an_unknown_items_or_params_key_is_an_error(monkeypatch):
    for bad in (dict(each="persona_vectors.traits.nmes"), dict(matrix={"t": "steering.tratis"})):
        monkeypatch.setitem(registry.STAGES, "fake", _fake(**bad))
        with pytest.raises(ValueError, match="stage fake: unknown params key"):
            registry.check_declarations()
    monkeypatch.setitem(registry.STAGES, "fake", dataclasses.replace(_fake(each="steering.traits"),
                                                                     params=("steering.nope",)))
    with pytest.raises(ValueError, match="unknown params key 'steering.nope'"):
        registry.check_declarations()


def test_matrix_items_map_to_stable_dvc_names(tmp_path, monkeypatch):
    params = params_of({"persona_vectors": {"traits": {"names": ["evil", "sycophantic"]}},
                        "steering": {"layers": [10, 20]}})
    fake = _fake(matrix={"trait": "persona_vectors.traits.names", "layer": "steering.layers"})
    names = [i.name for i in registry.items(fake, params)]
    assert names == ["evil-10", "evil-20", "sycophantic-10", "sycophantic-20"]
    assert registry.items(fake, params)[1].value == {"trait": "evil", "layer": "20"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params.model_dump(mode="json")))
    entry = registry.dvc_stage(fake, params, tmp_path)
    entry["deps"] = []  # only the naming matters here
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"fake": entry}}, sort_keys=False))
    assert run_dvc(tmp_path, "init", "--no-scm", "-q").returncode == 0
    listed = run_dvc(tmp_path, "stage", "list", "--name-only").stdout.split()
    assert listed == [f"fake@{n}" for n in names]  # DVC's names are the items' names


def test_object_items_are_named_by_their_key_not_their_position():
    ckpt = registry.STAGES["checkpoint_activations"]
    params = load_params(ROOT / "params.yaml")
    names = [i.name for i in registry.items(ckpt, params)]
    assert names == ["base", "step-12", "step-24", "step-36"]
    reordered = dict(reversed(list(params.persona_space.trajectory.checkpoints.items())))
    flipped = params.model_copy(update={"persona_space": params.persona_space.model_copy(update={
        "trajectory": params.persona_space.trajectory.model_copy(update={"checkpoints": reordered})})})
    assert [i.name for i in registry.items(ckpt, flipped)] == names[::-1]
    body = registry.dvc_yaml(params, ROOT)["stages"]["checkpoint_activations"]
    assert body["foreach"] == "${persona_space.trajectory.checkpoints}"
    assert "persona_space.trajectory.checkpoints.${key}" in body["do"]["params"]
    assert body["do"]["cmd"] == "persona-ops stage checkpoint_activations --item '${key}'"


def test_unsafe_role_file_names_never_become_items(tmp_path):
    (tmp_path / "roles").mkdir()
    for name in ("default", "pirate", "x;touch pwned"):
        (tmp_path / "roles" / f"{name}.json").write_text("{}")
    params = params_of({"persona_space": {"roles": {"dir": "roles", "names": None}}})
    with pytest.raises(InputError, match="cannot name stages or files"):
        registry.items(registry.STAGES["role_transcripts"], params, tmp_path)


def test_plans_run_the_producers_of_every_input_first():
    params = load_params(ROOT / "params.yaml")
    made = registry._made_by(params, ROOT)
    for name, pipeline in registry.PIPELINES.items():
        plan = registry.plan(pipeline, params, ROOT)
        seen: set[str] = set()
        for task in plan:
            for need in registry._needs(task, params, ROOT, made):
                assert need.name in seen, f"{name}: {task.name} before {need.name}"
            seen.add(task.name)
        assert {s.name for s in pipeline.stages} <= {t.stage.name for t in plan}
    steering = [t.name for t in registry.plan(registry.PIPELINES["steering-sweep"], params, ROOT)]
    assert steering == ["generate@evil", "judge@evil", "activations@evil", "vectors@evil", "steering_sweep@evil"]
    space = [t.name for t in registry.plan(registry.PIPELINES["persona-space"], params, ROOT)]
    assert space[0] == "finetune"  # the reference model's adapter is {stage: finetune}


def test_stage_cli_reports_input_errors_cleanly(tmp_path):
    (tmp_path / "params.yaml").write_text("persona_vectors:\n  traits:\n    dir: nowhere\n    names: [evil]\n"
                                          "tracking:\n  enabled: false\n")
    result = CliRunner().invoke(app, ["stage", "generate", "--item", "evil", "--root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "persona-ops: input error:" in result.output and "nowhere/extract/evil.json" in result.output
    result = CliRunner().invoke(app, ["stage", "generate", "--item", "humorous", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "needs an item, one of: evil" in result.output


def test_results_name_the_outputs_of_the_pipeline_asked_for(tmp_path):
    import shutil

    shutil.copytree(ROOT / "data", tmp_path / "data")
    text = (ROOT / "params.yaml").read_text().replace("tracking:\n  enabled: true", "tracking:\n  enabled: false")
    (tmp_path / "params.yaml").write_text(text)
    out = CliRunner().invoke(app, ["results", "persona-space", "--root", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "outputs/persona_space/persona_space.safetensors  (missing)" in out.output
    assert "capping.safetensors" in out.output and "persona_vectors" not in out.output
    out = CliRunner().invoke(app, ["results", "nope", "--root", str(tmp_path)])
    assert out.exit_code == 2 and "unknown pipeline 'nope'" in out.output
