"""The persona-space pipeline on a tiny model: shipped role data, resumable transcripts,
judge -> activations -> persona space -> trajectory files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import params_of, pool_of, run_stage

from persona_ops.data import check_paths, load_questions, load_role
from persona_ops.errors import InputError
from persona_ops.judge import CachedScore
from persona_ops.pipelines.persona_space import config as cfg
from persona_ops.pipelines.persona_space.activations import read_activations
from persona_ops.pipelines.persona_space.roles import model_short_name, record_key
from persona_ops.pipelines.persona_space.transcripts import build_role_requests

REPO = Path(__file__).resolve().parents[1]
ROLES_DIR = REPO / "data" / "roles"
REFERENCE = Path("/work/shared/reference-data/assistant-axis")
END = "Respond with a number between 0 and 3. Don't say anything else, just the number."
KEPT, DROPPED = ("pirate", "poet", "surfer"), "chef"


# --- shipped and reference data -------------------------------------------------

def test_shipped_role_data_is_valid():
    summaries, errors = check_paths([ROLES_DIR])
    assert errors == []
    files = sorted((ROLES_DIR / "instructions").glob("*.json"))
    roles = [load_role(p) for p in files]
    assert sum(not r.is_default for r in roles) >= 20
    for role in roles:
        if role.is_default:
            assert role.eval_prompt is None and "" in role.instructions
            assert any("{model_name}" in i for i in role.instructions) and len(role.instructions) == 5
            assert "{model_name}" not in " ".join(role.system_prompts("Qwen"))
            continue
        assert len(role.instructions) == 5 and all(i.strip() for i in role.instructions), role.name
        assert role.questions and role.eval_prompt.rstrip().endswith(END), role.name
        assert "**" in role.eval_prompt and "{question}" in role.eval_prompt and "{answer}" in role.eval_prompt
    questions = load_questions(ROLES_DIR / "questions.jsonl")
    assert len(questions) >= 40 and len({q.question for q in questions}) == len(questions)


@pytest.mark.skipif(not REFERENCE.exists(), reason="assistant-axis reference data not present")
def test_loaders_accept_reference_roles(smol_tokenizer):
    files = sorted((REFERENCE / "roles" / "instructions").glob("*.json"))
    roles = [load_role(p) for p in files]
    assert len(roles) >= 270 and sum(r.is_default for r in roles) == 1
    assert all(r.eval_prompt for r in roles if not r.is_default)
    questions = load_questions(REFERENCE / "extraction_questions.jsonl")
    assert len(questions) == 240
    roles_cfg = cfg.RolesCfg(model_name="Qwen", questions_limit=2)
    default = next(r for r in roles if r.is_default)
    reqs = build_role_requests(default, questions, smol_tokenizer, roles_cfg, 1,
                               model_short_name(roles_cfg, cfg.PersonaSpaceParams().model))
    assert len(reqs) == 5 * 2 and "You are Qwen." in {r["system_prompt"] for r in reqs}
    assert reqs[0]["system_prompt"] == "" and questions[0].question in reqs[0]["prompt"]


# --- a small project ------------------------------------------------------------------

ROLES = ["default", *KEPT, DROPPED]
OUT = "outputs/persona_space"


def _project(root: Path) -> Path:
    inst = root / "roles" / "instructions"
    inst.mkdir(parents=True)
    for name in ROLES:
        shutil.copy(ROLES_DIR / "instructions" / f"{name}.json", inst)
    shutil.copy(ROLES_DIR / "questions.jsonl", root / "roles" / "questions.jsonl")
    return root


def _params(roles=ROLES, **over):
    ps = {"model": {"name": "embedded", "adapter": None},
          "roles": {"dir": "roles/instructions", "questions": "roles/questions.jsonl", "names": list(roles),
                    "instructions_limit": 2, "questions_limit": 2, "model_name": "Tiny"},
          "transcripts": {"rollouts": 2, "batch_size": 4, "chunk_size": 3,
                          "sampling": {"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0}},
          "activations": {"layers": [1, 2, 4], "batch_size": 8, "chunk_size": 5},
          "vectors": {"min_count": 2},
          "trajectory": {"checkpoints": {"sft": {"step": 0, "model": {"name": "unused"}},
                                         "dpo": {"step": 1, "model": {"name": "unused"}}}}}
    ps.update(over)
    return params_of({"persona_space": ps})


class _Killed(Exception):
    pass


class StubJudge:
    """Scores by role: the kept roles fully play the role (label 3), the dropped one never does.
    (The embedded model cannot judge role expression; this stands in for a real judge.)"""

    label = "stub-judge"
    backend_calls = 0

    def score_details(self, prompts, lo=0, hi=3):
        out = []
        for p in prompts:
            full = "**temperamental head chef**" not in p  # the chef role's eval prompt
            probs = {3: 0.8, 2: 0.2} if full else {1: 0.7, 3: 0.3}
            out.append(CachedScore(sum(k * v for k, v in probs.items()), probs, lo, hi))
        return out


@pytest.fixture
def stub_judge(monkeypatch):
    from persona_ops.pipelines.persona_space import judging

    monkeypatch.setattr(judging, "make_judge", lambda *a, **k: StubJudge())


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".jsonl"}


def _each(stage, params, root, pool, roles=ROLES, **kwargs) -> dict:
    """``stage`` for every role; metrics summed."""
    total: dict = {}
    for role in roles:
        for k, v in run_stage(stage, params, root, role, pool, **kwargs).metrics.items():
            total[k] = total.get(k, 0) + v
    return total


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_loaded):
    root = _project(tmp_path_factory.mktemp("ref"))
    return root, _each("role_transcripts", _params(), root, pool_of(tiny_loaded))


def test_transcripts_layout(reference_run):
    root, res = reference_run
    d = root / OUT / "transcripts"
    assert res["records"] == 5 * 2 * 2 * 2 and res["generated"] == 40
    recs = [json.loads(x) for x in (d / "pirate.jsonl").read_text().splitlines()]
    assert [record_key(r) for r in recs] == [(s, q, r) for s in range(2) for q in range(2) for r in range(2)]
    assert set(recs[0]) == {"system_prompt_idx", "question_idx", "rollout_idx", "system_prompt", "question",
                            "prompt", "response"}
    default = [json.loads(x) for x in (d / "default.jsonl").read_text().splitlines()]
    assert default[0]["system_prompt"] == "" and default[0]["question"] in default[0]["prompt"]
    assert not list(d.glob("*.partial*"))
    prov = json.loads((d / "pirate.jsonl.prov.json").read_text())
    assert prov["stage"] == "role_transcripts" and prov["item"] == "pirate" and prov["fingerprint"]
    assert {i["path"] for i in prov["inputs"]} == {"roles/instructions/pirate.json", "roles/questions.jsonl"}


def test_resume_after_kill_loses_and_duplicates_nothing(reference_run, tmp_path, tiny_loaded):
    ref_root, _ = reference_run
    root = _project(tmp_path)
    params, pool = _params(roles=["default", "pirate"]), pool_of(tiny_loaded)
    calls: list[tuple[str, int]] = []

    def kill_after_1(role, chunk):
        calls.append((role, chunk))
        if len(calls) == 1:  # pirate's first chunk on disk
            raise _Killed

    run_stage("role_transcripts", params, root, "default", pool)
    with pytest.raises(_Killed):
        run_stage("role_transcripts", params, root, "pirate", pool, on_chunk=kill_after_1)
    d = root / OUT / "transcripts"
    partial = d / "pirate.partial.jsonl"
    assert (d / "default.jsonl").exists() and not (d / "pirate.jsonl").exists()
    # simulate a kill in the middle of the next append: two whole lines of a chunk, then a torn one
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    partial.write_text("".join(lines[:2]) + lines[2][:25])

    resumed: list[tuple[str, int]] = []
    assert run_stage("role_transcripts", params, root, "default", pool).metrics["skipped"] == 1  # complete
    run_stage("role_transcripts", params, root, "pirate", pool, on_chunk=lambda r, c: resumed.append((r, c)))
    assert resumed == [("pirate", 0), ("pirate", 1), ("pirate", 2)]
    ref = _files(ref_root / OUT / "transcripts")
    assert _files(d) == {k: ref[k] for k in ("default.jsonl", "pirate.jsonl")}  # as an uninterrupted run
    for f in d.glob("*.jsonl"):
        keys = [record_key(json.loads(x)) for x in f.read_text().splitlines()]
        assert len(keys) == len(set(keys)) == 8
    assert not list(d.glob("*.partial*"))

    # a finished role is skipped as a whole, and stale partial files are cleaned up
    (d / "pirate.partial.jsonl").write_text("{}\n")
    again = run_stage("role_transcripts", params, root, "pirate", pool)
    assert again.metrics["generated"] == 0 and again.metrics["skipped"] == 1
    assert not (d / "pirate.partial.jsonl").exists()
    # a changed parameter invalidates the finished files
    changed = _params(roles=["default", "pirate"], transcripts={
        "rollouts": 2, "batch_size": 4, "chunk_size": 3, "sampling": {"max_new_tokens": 1}})
    assert run_stage("role_transcripts", changed, root, "pirate", pool).metrics["generated"] == 8


def test_unimplemented_backend_and_missing_role(tmp_path):
    root = _project(tmp_path)
    with pytest.raises(InputError, match=r"backend=vllm needs vLLM.*persona-ops\[vllm\]"):
        run_stage("role_transcripts", _params(transcripts={"backend": "vllm"}), root, "pirate")
    with pytest.raises(InputError, match="needs an item, one of: default, pirate.*got 'poet'"):
        run_stage("role_transcripts", _params(roles=["default", "pirate"]), root, "poet")
    for names, fragment in ((["pirate"], "must list 'default'"), (["default", "pirate", "pirate"], "more than once"),
                            (["default", "a;b"], "not a usable name")):
        with pytest.raises(ValueError, match=fragment):
            cfg.RolesCfg(names=names)


def test_judge_activations_space_trajectory(reference_run, tiny_loaded, stub_judge):
    from persona_ops.interp.space import load_persona_space

    root, _ = reference_run
    params, pool = _params(), pool_of(tiny_loaded)
    out = root / OUT
    j = _each("role_judge", params, root, pool)
    assert j["judged"] == 32 and (out / "scores" / "default.scores.jsonl").read_text() == ""
    row = json.loads((out / "scores" / "pirate.scores.jsonl").read_text().splitlines()[3])
    assert row["index"] == 3 and row["label"] == 3 and record_key(row) == (0, 1, 1)
    assert row["score"] == pytest.approx(2.8)

    a = _each("role_activations", params, root, pool)
    meta = json.loads((out / "activations" / "pirate_metadata.json").read_text())
    assert a["layers"] == 3 * 5 and a["captured"] + a["empty"] == 40
    assert set(meta[0]) == {"system_prompt_idx", "question_idx", "rollout_idx"}
    acts, keys, header = read_activations(out / "activations", "pirate")
    assert tuple(acts.shape) == (len(meta), 3, tiny_loaded.hidden_size) and header["layers"] == [1, 2, 4]
    assert _each("role_activations", params, root, pool)["skipped"] == 5

    s = run_stage("persona_space", params, root)
    report = json.loads((out / "persona_space.metrics.json").read_text())
    assert report["dropped_roles"] == {DROPPED: 0} and s.metrics["n_roles"] == 3 and s.metrics["layer"] == 2
    assert set(report["pcs_for"]) == {"0.7", "0.8", "0.9"} and "axis_pc1_cos" in report
    space = load_persona_space(out / "persona_space.safetensors")
    assert space.roles == sorted(KEPT) and space.layers == [1, 2, 4] and float(space.default_coords[0]) > 0
    used = {i["path"] for i in s.record["inputs"]}
    assert f"{OUT}/scores/chef.scores.jsonl" in used and f"{OUT}/activations/default_activations.safetensors" in used

    # two checkpoints that are the same model: a flat trajectory at the reference coordinates
    for c in ("sft", "dpo"):
        run_stage("checkpoint_activations", params, root, c, pool)
    t = run_stage("trajectory", params, root)
    recs = [json.loads(x) for x in (out / "trajectory" / "trajectory.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in recs] == ["sft", "dpo"]
    strip = [{k: v for k, v in r.items() if k not in ("checkpoint", "step")} for r in recs]
    assert strip[0] == strip[1] and t.metrics["default_axis_change"] == 0
    for i, name in enumerate(space.roles):
        assert recs[0]["roles"][name]["pcs"] == pytest.approx(space.loadings[i, :2].tolist(), abs=1e-3)
    assert recs[0]["default"]["pcs"][0] > 0 and recs[0]["axis_cos_reference"] == pytest.approx(1.0, abs=1e-5)
    for name in ("pc_scatter", "axis_projection", "pc_coordinates", "default_path"):
        assert (out / "trajectory" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    # capping: tau per layer from the default Assistant's projections on this space's axis
    import numpy as np

    from persona_ops.interp.capping import load_capping

    capped = run_stage("capping", _params(capping={"layers": [1, 2], "percentile": 25}), root)
    spec = load_capping(out / "capping.safetensors")
    default_acts, _, _ = read_activations(out / "activations", "default")
    assert spec.layers == [1, 2] and capped.metrics["layers"] == 2
    summary = json.loads((out / "capping.json").read_text())
    for i, layer in enumerate(spec.layers):
        u = space.unit_axis(layer)
        floor = np.percentile((default_acts[:, space.row(layer)].double() @ u).numpy(), 25)
        assert float(spec.tau[i]) == pytest.approx(-floor, abs=1e-5)
        assert summary["layers"][str(layer)]["assistant_floor"] == pytest.approx(floor, abs=1e-5)
    with pytest.raises(InputError, match=r"\[3\] were not captured"):
        run_stage("capping", _params(capping={"layers": [2, 4]}), root)


def test_role_capture_computes_only_the_asked_layers(reference_run, tiny_loaded, tmp_path, monkeypatch):
    """Role activations capture the response means of the configured layers only (the forward
    stops at the deepest), and equal the same rows of an all-layers capture."""
    import torch

    from persona_ops.interp import capture as capture_module

    ref_root, _ = reference_run
    root = _project(tmp_path)
    shutil.copytree(ref_root / OUT / "transcripts", root / OUT / "transcripts")
    asked = []
    real = capture_module.capture_tokens
    monkeypatch.setattr(capture_module, "capture_tokens",
                        lambda *a, **k: asked.append((k["layers"], k["aggregates"])) or real(*a, **k))
    run_stage("role_activations", _params(), root, "pirate", pool_of(tiny_loaded))
    assert asked and all(a == ([1, 2], ("response_avg",)) or a == ([1, 2, 4], ("response_avg",)) for a in asked)
    few, _, _ = read_activations(root / OUT / "activations", "pirate")
    run_stage("role_activations", _params(activations={"all_layers": True, "batch_size": 8}), root, "pirate",
              pool_of(tiny_loaded))
    every, _, header = read_activations(root / OUT / "activations", "pirate")
    assert header["layers"] == list(range(tiny_loaded.num_layers + 1))
    assert torch.allclose(few, every[:, [1, 2, 4]], atol=1e-5)


def test_one_role_at_a_time_and_stale_activations(reference_run, tiny_loaded, tmp_path, stub_judge):
    """What a DVC stage ``STAGE@role`` runs: only that role's files; activations are reused only
    while they match the role's transcripts."""
    ref_root, _ = reference_run
    root = _project(tmp_path)
    shutil.copytree(ref_root / OUT / "transcripts", root / OUT / "transcripts")
    params, pool = _params(), pool_of(tiny_loaded)
    acts = root / OUT / "activations"
    first = run_stage("role_activations", params, root, "surfer", pool)
    assert sorted(p.name for p in acts.iterdir()) == [
        "surfer_activations.safetensors", "surfer_activations.safetensors.prov.json", "surfer_metadata.json",
        "surfer_metadata.json.prov.json"]
    assert first.metrics["captured"] > 0
    assert run_stage("role_activations", params, root, "surfer", pool).metrics["skipped"] == 1
    # new responses under the same keys (e.g. a retrained reference model): captured again
    path = root / OUT / "transcripts" / "surfer.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "response": r["response"] + " ahoy"}) + "\n" for r in recs))
    again = run_stage("role_activations", params, root, "surfer", pool)
    assert again.metrics["skipped"] == 0 and again.metrics["captured"] == len(recs)
    j = run_stage("role_judge", params, root, "surfer", pool)
    assert j.metrics["judged"] == len(recs) and sorted(p.name for p in (root / OUT / "scores").iterdir()) == [
        "surfer.scores.jsonl", "surfer.scores.jsonl.prov.json"]


def test_families_side_by_side(reference_run, tiny_loaded, tmp_path, stub_judge):
    """Two model families in one trajectory: one record per checkpoint tagged with its family,
    one metric per family, the plots drawn; identical models give flat, equal trajectories."""
    ref_root, _ = reference_run
    root = tmp_path
    shutil.copytree(ref_root / "roles", root / "roles")
    shutil.copytree(ref_root / OUT / "transcripts", root / OUT / "transcripts")
    out, pool = root / OUT, pool_of(tiny_loaded)
    _each("role_judge", _params(), root, pool)
    _each("role_activations", _params(), root, pool)
    run_stage("persona_space", _params(), root)
    ckpts = {f"{fam}-{step}": {"family": fam, "step": step, "model": {"name": "unused"}}
             for fam in ("aligned", "control") for step in (0, 10)}
    params = _params(trajectory={"checkpoints": ckpts})
    assert list(params.persona_space.trajectory.families()) == ["aligned", "control"]
    for label in ckpts:
        run_stage("checkpoint_activations", params, root, label, pool)
    t = run_stage("trajectory", params, root)
    recs = [json.loads(x) for x in (out / "trajectory" / "trajectory.jsonl").read_text().splitlines()]
    assert [(r["family"], r["checkpoint"], r["step"]) for r in recs] == [
        ("aligned", "aligned-0", 0), ("aligned", "aligned-10", 10), ("control", "control-0", 0),
        ("control", "control-10", 10)]
    assert t.metrics["families"] == 2
    assert t.metrics["aligned/default_axis_change"] == t.metrics["control/default_axis_change"] == 0
    assert recs[0]["default"] == recs[2]["default"]
    for name in ("pc_scatter", "axis_projection", "pc_coordinates", "default_path"):
        assert (out / "trajectory" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="expected a mapping label"):
        _params(trajectory={"checkpoints": [{"label": "a", "model": {"name": "x"}}]})
