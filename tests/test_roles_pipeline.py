"""The persona-space pipeline on a tiny model: shipped role data, resumable transcripts,
judge -> activations -> persona space -> trajectory files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from persona_ops.data import check_paths, load_questions, load_role
from persona_ops.errors import InputError
from persona_ops.judge import CachedScore
from persona_ops.models.refs import ModelRef
from persona_ops.pipelines import persona_space as ps

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
    params = ps.PersonaSpaceParams(roles=ps.RolesCfg(model_name="Qwen", questions_limit=2))
    default = next(r for r in roles if r.is_default)
    reqs = ps.build_role_requests(default, questions, smol_tokenizer, params)
    assert len(reqs) == 5 * 2 and "You are Qwen." in {r["system_prompt"] for r in reqs}
    assert reqs[0]["system_prompt"] == "" and questions[0].question in reqs[0]["prompt"]


# --- a small project ------------------------------------------------------------------

def _project(root: Path) -> Path:
    inst = root / "roles" / "instructions"
    inst.mkdir(parents=True)
    for name in ("default", *KEPT, DROPPED):
        shutil.copy(ROLES_DIR / "instructions" / f"{name}.json", inst)
    shutil.copy(ROLES_DIR / "questions.jsonl", root / "roles" / "questions.jsonl")
    return root


def _params(**over) -> ps.PersonaSpaceParams:
    cfg = dict(
        roles=ps.RolesCfg(dir="roles/instructions", questions="roles/questions.jsonl",
                          names=["default", *KEPT, DROPPED], instructions_limit=2, questions_limit=2,
                          model_name="Tiny"),
        transcripts=ps.TranscriptsCfg(rollouts=2, max_new_tokens=3, temperature=1.0, top_p=1.0,
                                      batch_size=4, chunk_size=3),
        activations=ps.RoleActivationsCfg(layers=[1, 2, 4], batch_size=8, chunk_size=5),
        vectors=ps.RoleVectorsCfg(min_count=2),
        trajectory=ps.TrajectoryCfg(checkpoints=[
            ps.CheckpointCfg(label="sft", model=ModelRef(name="unused"), step=0),
            ps.CheckpointCfg(label="dpo", model=ModelRef(name="unused"), step=1)]),
        out="out")
    cfg.update(over)
    return ps.PersonaSpaceParams(**cfg)


class _Killed(Exception):
    pass


class StubJudge:
    """Scores by role: the kept roles fully play the role (label 3), the dropped one never does."""

    label = "stub-judge"
    backend_calls = 0

    def score_details(self, prompts, lo=0, hi=3):
        out = []
        for p in prompts:
            full = "**temperamental head chef**" not in p  # the chef role's eval prompt
            probs = {3: 0.8, 2: 0.2} if full else {1: 0.7, 3: 0.3}
            out.append(CachedScore(sum(k * v for k, v in probs.items()), probs, lo, hi))
        return out


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".jsonl"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_loaded):
    root = _project(tmp_path_factory.mktemp("ref"))
    res = ps.transcripts(_params(), root, loaded=tiny_loaded)
    return root, res


def test_transcripts_layout(reference_run):
    root, res = reference_run
    d = root / "out" / "transcripts"
    assert res.metrics["records"] == 5 * 2 * 2 * 2 and res.metrics["generated"] == 40
    recs = [json.loads(x) for x in (d / "pirate.jsonl").read_text().splitlines()]
    assert [ps.record_key(r) for r in recs] == [(s, q, r) for s in range(2) for q in range(2) for r in range(2)]
    assert set(recs[0]) == {"system_prompt_idx", "question_idx", "rollout_idx", "system_prompt", "question",
                            "prompt", "response"}
    default = [json.loads(x) for x in (d / "default.jsonl").read_text().splitlines()]
    assert default[0]["system_prompt"] == "" and default[0]["question"] in default[0]["prompt"]
    assert not list(d.glob("*.partial*"))


def test_resume_after_kill_loses_and_duplicates_nothing(reference_run, tmp_path, tiny_loaded):
    ref_root, _ = reference_run
    root = _project(tmp_path)
    params = _params(roles=ps.RolesCfg(dir="roles/instructions", questions="roles/questions.jsonl",
                                       names=["default", "pirate"], instructions_limit=2, questions_limit=2,
                                       model_name="Tiny"))
    calls: list[tuple[str, int]] = []

    def kill_after_4(role, chunk):
        calls.append((role, chunk))
        if len(calls) == 4:  # default's 3 chunks done, pirate's first chunk on disk
            raise _Killed

    with pytest.raises(_Killed):
        ps.transcripts(params, root, loaded=tiny_loaded, on_chunk=kill_after_4)
    d = root / "out" / "transcripts"
    partial = d / "pirate.partial.jsonl"
    assert (d / "default.jsonl").exists() and not (d / "pirate.jsonl").exists()
    # simulate a kill in the middle of the next append: two whole lines of a chunk, then a torn one
    lines = partial.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    partial.write_text("".join(lines[:2]) + lines[2][:25])

    resumed: list[tuple[str, int]] = []
    res = ps.transcripts(params, root, loaded=tiny_loaded, on_chunk=lambda r, c: resumed.append((r, c)))
    assert res.metrics["roles_skipped"] == 1  # default was complete
    assert resumed == [("pirate", 0), ("pirate", 1), ("pirate", 2)]
    ref = _files(ref_root / "out" / "transcripts")
    assert _files(d) == {k: ref[k] for k in ("default.jsonl", "pirate.jsonl")}  # as an uninterrupted run
    for f in d.glob("*.jsonl"):
        keys = [ps.record_key(json.loads(x)) for x in f.read_text().splitlines()]
        assert len(keys) == len(set(keys)) == 8
    assert not list(d.glob("*.partial*"))

    # a finished run is skipped as a whole, and stale partial files are cleaned up
    (d / "pirate.partial.jsonl").write_text("{}\n")
    again = ps.transcripts(params, root, loaded=tiny_loaded, on_chunk=lambda r, c: resumed.append(("x", c)))
    assert again.metrics["generated"] == 0 and again.metrics["roles_skipped"] == 2
    assert not (d / "pirate.partial.jsonl").exists()
    # a changed parameter invalidates the finished files
    changed = ps.transcripts(params.model_copy(update={"transcripts": ps.TranscriptsCfg(
        rollouts=2, max_new_tokens=1, batch_size=4, chunk_size=3)}), root, loaded=tiny_loaded)
    assert changed.metrics["generated"] == 16


def test_unimplemented_backend_and_missing_role(tmp_path):
    root = _project(tmp_path)
    with pytest.raises(InputError, match=r"backend=vllm needs vLLM.*persona-ops\[vllm\]"):
        ps.transcripts(_params(transcripts=ps.TranscriptsCfg(backend="vllm")), root)
    with pytest.raises(InputError, match="no role file for ghost"):
        ps.role_names(_params(roles=ps.RolesCfg(dir="roles/instructions", names=["default", "ghost"])), root)
    with pytest.raises(InputError, match="'poet' is not in persona_space.roles.names"):
        ps.transcripts(_params(roles=ps.RolesCfg(dir="roles/instructions", names=["default", "pirate"])), root,
                       role="poet")
    for names, fragment in ((["pirate"], "must list 'default'"), (["default", "pirate", "pirate"], "more than once")):
        with pytest.raises(ValueError, match=fragment):
            ps.RolesCfg(names=names)


def test_judge_activations_space_trajectory(reference_run, tiny_loaded):
    from persona_ops.interp.space import load_persona_space

    root, _ = reference_run
    params = _params()
    out = root / "out"
    j = ps.judge_roles(params, root, judge=StubJudge())
    assert j.metrics["judged"] == 32 and (out / "scores" / "default.scores.jsonl").read_text() == ""
    row = json.loads((out / "scores" / "pirate.scores.jsonl").read_text().splitlines()[3])
    assert row["index"] == 3 and row["label"] == 3 and ps.record_key(row) == (0, 1, 1)
    assert row["score"] == pytest.approx(2.8)

    a = ps.role_activations(params, root, loaded=tiny_loaded)
    meta = json.loads((out / "activations" / "pirate_metadata.json").read_text())
    assert a.metrics["layers"] == 3 and a.metrics["captured"] + a.metrics["empty_responses"] == 40
    assert set(meta[0]) == {"system_prompt_idx", "question_idx", "rollout_idx"}
    acts, keys, header = ps.read_activations(out / "activations", "pirate")
    assert tuple(acts.shape) == (len(meta), 3, tiny_loaded.hidden_size) and header["layers"] == [1, 2, 4]
    assert ps.role_activations(params, root, loaded=tiny_loaded).metrics["roles_skipped"] == 5

    s = ps.persona_space(params, root)
    report = json.loads((out / "persona_space.metrics.json").read_text())
    assert report["dropped_roles"] == {DROPPED: 0} and s.metrics["n_roles"] == 3 and s.metrics["layer"] == 2
    assert set(report["pcs_for"]) == {"0.7", "0.8", "0.9"} and "axis_pc1_cos" in report
    space = load_persona_space(out / "persona_space.safetensors")
    assert space.roles == sorted(KEPT) and space.layers == [1, 2, 4] and float(space.default_coords[0]) > 0
    assert s.register == {"persona-space-smollm2-135m-instruct": out / "persona_space.safetensors"}

    # two checkpoints that are the same model: a flat trajectory at the reference coordinates
    for c in ("sft", "dpo"):
        ps.role_activations(params, root, loaded=tiny_loaded, checkpoint=c)
    t = ps.trajectory(params, root)
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

    capped = ps.capping(params.model_copy(update={"capping": ps.CappingCfg(layers=[1, 2], percentile=25)}), root)
    spec = load_capping(out / "capping.safetensors")
    default_acts, _, _ = ps.read_activations(out / "activations", "default")
    assert spec.layers == [1, 2] and capped.metrics["layers"] == 2
    summary = json.loads((out / "capping.json").read_text())
    for i, layer in enumerate(spec.layers):
        u = space.unit_axis(layer)
        floor = np.percentile((default_acts[:, space.row(layer)].double() @ u).numpy(), 25)
        assert float(spec.tau[i]) == pytest.approx(-floor, abs=1e-5)
        assert summary["layers"][str(layer)]["assistant_floor"] == pytest.approx(floor, abs=1e-5)
    assert capped.register == {"capping-spec-smollm2-135m-instruct": out / "capping.safetensors"}
    with pytest.raises(InputError, match=r"\[3\] were not captured"):
        ps.capping(params.model_copy(update={"capping": ps.CappingCfg(layers=[2, 4])}), root)


def test_one_role_at_a_time_and_stale_activations(reference_run, tiny_loaded, tmp_path):
    """What a DVC stage ``STAGE@role`` runs: only that role's files; activations are reused only
    while they match the role's transcripts."""
    ref_root, _ = reference_run
    root = _project(tmp_path)
    shutil.copytree(ref_root / "out" / "transcripts", root / "out" / "transcripts")
    params = _params()
    acts = root / "out" / "activations"
    first = ps.role_activations(params, root, loaded=tiny_loaded, role="surfer")
    assert first.metrics["roles"] == 1 and sorted(p.name for p in acts.iterdir()) == [
        "surfer_activations.safetensors", "surfer_metadata.json"]
    assert ps.role_activations(params, root, loaded=tiny_loaded, role="surfer").metrics["roles_skipped"] == 1
    # new responses under the same keys (e.g. a retrained reference model): captured again
    path = root / "out" / "transcripts" / "surfer.jsonl"
    recs = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, "response": r["response"] + " ahoy"}) + "\n" for r in recs))
    again = ps.role_activations(params, root, loaded=tiny_loaded, role="surfer")
    assert again.metrics["roles_skipped"] == 0 and again.metrics["captured"] == len(recs)
    j = ps.judge_roles(params, root, judge=StubJudge(), role="surfer")
    assert j.metrics["judged"] == len(recs) and sorted(p.name for p in (root / "out" / "scores").iterdir()) == [
        "surfer.scores.jsonl", "surfer.scores.provenance.json"]


def test_families_side_by_side(reference_run, tiny_loaded, tmp_path):
    """Two model families in one trajectory: one record per checkpoint tagged with its family,
    one metric per family, the plots drawn; identical models give flat, equal trajectories."""
    ref_root, _ = reference_run
    root = tmp_path
    shutil.copytree(ref_root / "roles", root / "roles")
    shutil.copytree(ref_root / "out" / "transcripts", root / "out" / "transcripts")
    out = root / "out"
    ps.judge_roles(_params(), root, judge=StubJudge())
    ps.role_activations(_params(), root, loaded=tiny_loaded)
    ps.persona_space(_params(), root)
    ckpts = [ps.CheckpointCfg(label=f"{fam}-{step}", family=fam, step=step, model=ModelRef(name="unused"))
             for fam in ("aligned", "control") for step in (0, 10)]
    params = _params(trajectory=ps.TrajectoryCfg(checkpoints=ckpts))
    assert list(params.trajectory.families()) == ["aligned", "control"]
    for c in ckpts:
        ps.role_activations(params, root, loaded=tiny_loaded, checkpoint=c.label)
    t = ps.trajectory(params, root)
    recs = [json.loads(x) for x in (out / "trajectory" / "trajectory.jsonl").read_text().splitlines()]
    assert [(r["family"], r["checkpoint"], r["step"]) for r in recs] == [
        ("aligned", "aligned-0", 0), ("aligned", "aligned-10", 10), ("control", "control-0", 0),
        ("control", "control-10", 10)]
    assert t.metrics["families"] == 2
    assert t.metrics["aligned/default_axis_change"] == t.metrics["control/default_axis_change"] == 0
    assert recs[0]["default"] == recs[2]["default"]
    for name in ("pc_scatter", "axis_projection", "pc_coordinates", "default_path"):
        assert (out / "trajectory" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
