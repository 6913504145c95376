"""Stage ``trajectory``: every checkpoint placed in the reference persona space, per model family."""

from __future__ import annotations

from persona_ops.errors import InputError
from persona_ops.io import write_jsonl
from persona_ops.pipelines.persona_space.roles import OUT
from persona_ops.pipelines.persona_space.space import build_role_vectors
from persona_ops.pipelines.stage import AllOutputs, Output, stage


@stage("trajectory", pipeline="trajectory", params=["persona_space.vectors", "persona_space.trajectory"],
       inputs={"space": Output("persona_space", "space"),
               "checkpoints": AllOutputs("checkpoint_activations", "activations"),
               "scores": AllOutputs("role_judge", "scores")},
       outputs={"trajectory": OUT + "/trajectory"})
def trajectory(cfg, io) -> dict:
    """A trajectory point per checkpoint (``trajectory.jsonl``) and plots, one line per family.

    Role vectors at a checkpoint use the *reference* scores and threshold (the same samples at
    every checkpoint), without ``min_count`` (the reference space already chose its roles).
    Metrics ``default_axis_*`` are the first family's; with several families each also gets
    ``<family>/default_axis_change``."""
    from persona_ops.interp.space import checkpoint_coordinates, load_persona_space
    from persona_ops.reports.trajectory import group_by_family, plot_trajectory

    t = cfg.persona_space.trajectory
    if not t.checkpoints:
        raise InputError("persona_space.trajectory.checkpoints is empty; give label: {step, model} entries")
    space = load_persona_space(io.input("space"))
    dirs, scores = io.each("checkpoints"), io.each("scores")
    roles = list(scores)
    records = []
    for label, c in t.checkpoints.items():
        vectors, default, _, layers, _ = build_role_vectors(roles, dirs[label], scores, cfg.persona_space.vectors,
                                                            min_count=1)
        rec = checkpoint_coordinates(space, vectors, default, layers, t.n_pcs)
        records.append({"checkpoint": label, "step": c.step, **rec, "family": c.family})
    out = io.output("trajectory")
    write_jsonl(out / "trajectory.jsonl", records)
    plot_trajectory(records, out, space, t.label_roles)
    families = group_by_family(records)
    change = {f: recs[-1]["default"]["axis"] - recs[0]["default"]["axis"] for f, recs in families.items()}
    first = next(iter(families.values()))
    metrics = {"checkpoints": len(records), "families": len(families),
               "default_axis_first": first[0]["default"]["axis"], "default_axis_last": first[-1]["default"]["axis"],
               "default_axis_change": next(iter(change.values())),
               "axis_cos_reference_min": min(r["axis_cos_reference"] for r in records)}
    if len(families) > 1:
        metrics.update({f"{f}/default_axis_change": v for f, v in change.items()})
    return metrics
