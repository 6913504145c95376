"""Stages ``persona_space`` (role vectors, PCA, the Assistant Axis) and ``capping`` (the capping
spec on the axis), and the role-vector builder the trajectory reuses."""

from __future__ import annotations

from pathlib import Path

import torch

from persona_ops.data import DEFAULT_ROLE
from persona_ops.errors import InputError
from persona_ops.io import read_jsonl, write_json
from persona_ops.pipelines.persona_space.activations import read_activations
from persona_ops.pipelines.persona_space.roles import OUT, record_key
from persona_ops.pipelines.stage import AllOutputs, Output, Register, stage


def read_scores(path: Path, score_field: str) -> dict[tuple, float | None]:
    """``(system_prompt_idx, question_idx, rollout_idx) -> score`` (``vectors.score_field``)."""
    return {record_key(r): r[score_field] for r in read_jsonl(path)}


def build_role_vectors(roles: list[str], acts_dir: Path, scores: dict[str, Path], vectors_cfg,
                       min_count: int | None = None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, int], list[int], int]:
    """Role vectors (samples whose reference score passes ``vectors.threshold``), the default vector,
    the roles dropped (name -> qualifying count), the captured layers and the model's layer count."""
    from persona_ops.interp.space import count_passing, default_vector, role_vector

    v = vectors_cfg
    min_count = v.min_count if min_count is None else min_count
    vectors: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    default = layers = num_layers = None
    for name in roles:
        acts, keys, header = read_activations(acts_dir, name)
        if layers is None:
            layers, num_layers = [int(x) for x in header["layers"]], int(header["num_layers"])
        elif [int(x) for x in header["layers"]] != layers:
            raise InputError(f"{acts_dir}: role {name!r} has layers {header['layers']}, others {layers}")
        if name == DEFAULT_ROLE:
            default = default_vector(acts)
            continue
        by_key = read_scores(scores[name], v.score_field)
        s = [by_key.get(k) for k in keys]
        vec = role_vector(acts, s, v.threshold, min_count)
        if vec is None:
            dropped[name] = count_passing(s, v.threshold)
        else:
            vectors[name] = vec
    if default is None:
        raise InputError(f"{acts_dir}: no activations of the {DEFAULT_ROLE!r} role")
    return vectors, default, dropped, layers, num_layers


@stage("persona_space", pipeline="persona-space",
       params=["persona_space.model", "persona_space.vectors", "persona_space.space"],
       inputs={"activations": AllOutputs("role_activations", "activations"),
               "metadata": AllOutputs("role_activations", "metadata"), "scores": AllOutputs("role_judge", "scores")},
       outputs={"space": OUT + "/persona_space.safetensors", "role_vectors": OUT + "/role_vectors.safetensors",
                "report": OUT + "/persona_space.metrics.json"},
       registers=(Register("space", "persona-space-{model}", "persona-space"),))
def persona_space(cfg, io) -> dict:
    """Role vectors, the default vector, PCA at the space layer, the Assistant Axis, cosines."""
    from persona_ops.interp.space import fit_persona_space, middle_layer, save_persona_space
    from persona_ops.interp.vectors import save_vectors

    ps = cfg.persona_space
    acts = io.each("activations")
    roles = list(acts)
    acts_dir = next(iter(acts.values())).parent
    vectors, default, dropped, layers, num_layers = build_role_vectors(roles, acts_dir, io.each("scores"), ps.vectors)
    layer = ps.space.layer if ps.space.layer is not None else middle_layer(num_layers)
    if layer not in layers:
        raise InputError(f"persona_space.space.layer={layer} was not captured (activations have layers {layers}); "
                         "set persona_space.activations.layers or .all_layers")
    v = ps.vectors
    if len(vectors) < 2:
        raise InputError(f"only {len(vectors)} roles have >= vectors.min_count={v.min_count} samples with "
                         f"{v.score_field} >= {v.threshold} (dropped: {dropped}); lower "
                         "persona_space.vectors.min_count or generate more rollouts")
    space = fit_persona_space(vectors, default, layer, layers)
    model = read_activations(acts_dir, roles[0])[2].get("model", "unknown")
    io.made_with(model)
    meta = {"model": model, "num_layers": num_layers, "threshold": v.threshold, "min_count": v.min_count,
            "score_field": v.score_field, "dropped": dropped}
    save_persona_space(io.output("space"), space, meta)
    save_vectors(io.output("role_vectors"), {**vectors, "default": default}, {**meta, "layers": layers})
    summary = space.summary()
    write_json(io.output("report"), {
        **summary, "n_dropped": len(dropped), "dropped_roles": dropped,
        "explained_variance_ratio": [float(x) for x in space.explained_variance_ratio[:50]],
        "pcs_for": space.pcs_for_levels, "layers": layers,
        "axis_pc1_cos_per_layer": {str(L): float(c) for L, c in zip(layers, space.axis_pc1_cos)},
        "default_pcs": [float(x) for x in space.default_coords[:10]],
        "role_pc1": {r: float(x) for r, x in zip(space.roles, space.loadings[:, 0])}})
    return {**summary, "n_dropped": len(dropped)}


@persona_space.validator
def _space_layer(cfg, io) -> None:
    ps = cfg.persona_space
    if ps.space.layer is not None:
        io.check_layers(ps.model, "persona_space.space.layer", [ps.space.layer], first=0)


@stage("capping", pipeline="persona-space", params=["persona_space.model", "persona_space.capping"],
       inputs={"space": Output("persona_space", "space"),
               "default": Output("role_activations", "activations", item="default"),
               "default_rows": Output("role_activations", "metadata", item="default")},
       outputs={"spec": OUT + "/capping.safetensors", "summary": OUT + "/capping.json"},
       registers=(Register("spec", "capping-spec-{model}", "capping-spec"),))
def capping(cfg, io) -> dict:
    """The activation-capping spec of this persona space's Assistant Axis: at each layer of
    ``capping.layers`` the floor is ``capping.percentile`` of the default Assistant's projections
    (one per default sample). ``capping.safetensors`` is what ``load_capping`` and
    ``serve-model --capping`` read; ``capping.json`` holds per-layer tau and floor."""
    from persona_ops.interp.capping import CONVENTION, compute_capping, layer_range, save_capping
    from persona_ops.interp.space import load_persona_space

    c = cfg.persona_space.capping
    space = load_persona_space(io.input("space"))
    acts, _, header = read_activations(io.input("default").parent, DEFAULT_ROLE)
    spec = compute_capping(space.axis, space.layers, acts, header["layers"], layer_range(c.layers, space.layer),
                           c.percentile, int(header["num_layers"]))
    io.made_with(header.get("model", "unknown"))
    save_capping(io.output("spec"), spec, {"model": header.get("model")})
    write_json(io.output("summary"), {
        "spec": io.output("spec").name, "percentile": c.percentile, "convention": CONVENTION,
        "n_default_samples": int(acts.shape[0]), "model": header.get("model"),
        "layers": {str(L): {"tau": float(t), "assistant_floor": float(f)}
                   for L, t, f in zip(spec.layers, spec.tau, spec.floors)}})
    return {"layers": len(spec.layers), "percentile": c.percentile, "n_default_samples": int(acts.shape[0]),
            "floor_min": float(spec.floors.min()), "floor_max": float(spec.floors.max())}


@capping.validator
def _capping_layers(cfg, io) -> None:
    ps = cfg.persona_space
    if ps.capping.layers is not None:
        io.check_layers(ps.model, "persona_space.capping.layers", ps.capping.layers)
