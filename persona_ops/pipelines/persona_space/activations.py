"""Stages ``role_activations`` (the reference model, per role) and ``checkpoint_activations`` (every
role's reference transcripts replayed through one checkpoint of a trajectory).

Per record: the mean residual stream over the response tokens at the configured layers only
(capture stops at the deepest one). Records with an empty response are skipped (no response
tokens); ``<role>_metadata.json`` lists the kept rows. A role whose files match its
transcripts (sha256), layers and model is skipped (resume).
"""

from __future__ import annotations

from pathlib import Path

import torch

from persona_ops.errors import InputError
from persona_ops.io import read_json, read_jsonl, sha256_file, write_json
from persona_ops.pipelines.persona_space.roles import KEY_FIELDS, OUT, record_key, role_files
from persona_ops.pipelines.stage import AllOutputs, Output, stage

ROLE_ACTIVATIONS = OUT + "/activations/{item}_activations.safetensors"
ROLE_METADATA = OUT + "/activations/{item}_metadata.json"


def capture_layers(acts_cfg, space_cfg, num_layers: int) -> list[int]:
    """The ``hidden_states`` layers to keep: all, ``activations.layers``, or ``[space layer]``."""
    from persona_ops.interp.space import middle_layer

    if acts_cfg.all_layers:
        return list(range(num_layers + 1))
    layers = acts_cfg.layers
    if layers is None:
        layers = [space_cfg.layer if space_cfg.layer is not None else middle_layer(num_layers)]
    bad = [x for x in layers if not 0 <= x <= num_layers]
    if bad:
        raise InputError(f"persona_space.activations.layers: {bad} outside 0..{num_layers} (hidden_states indices)")
    return sorted(set(layers))


def activation_paths(d: Path, role: str) -> tuple[Path, Path]:
    return d / f"{role}_activations.safetensors", d / f"{role}_metadata.json"


def _current(tensor_path: Path, meta_path: Path, keys: list[dict], layers: list[int], model: str,
             transcripts_sha256: str) -> bool:
    """Whether a role's activation files were made from these transcripts, layers and model."""
    from persona_ops.interp.vectors import decode_metadata, load_vectors

    if not (tensor_path.exists() and meta_path.exists()) or read_json(meta_path) != keys:
        return False
    header = decode_metadata(load_vectors(tensor_path)[1])
    return (header.get("layers") == layers and header.get("model") == model
            and header.get("transcripts_sha256") == transcripts_sha256)


def capture_role(loaded, name: str, transcripts: Path, tensor_path: Path, meta_path: Path, acts_cfg,
                 layers: list[int], checkpoint: str = "") -> dict:
    """Capture one role's response means into ``tensor_path`` (+ its row keys in ``meta_path``)."""
    from persona_ops.interp.capture import capture
    from persona_ops.interp.vectors import save_vectors

    records = read_jsonl(transcripts)
    kept = [r for r in records if r["response"].strip()]
    keys = [{k: r[k] for k in KEY_FIELDS} for r in kept]
    source_sha = sha256_file(transcripts)
    stats = {"captured": 0, "skipped": 0, "empty": len(records) - len(kept)}
    if acts_cfg.resume and _current(tensor_path, meta_path, keys, layers, loaded.label, source_sha):
        stats["skipped"] = 1
        return stats
    parts = []
    for start in range(0, len(kept), acts_cfg.chunk_size):
        chunk = kept[start:start + acts_cfg.chunk_size]
        res = capture(loaded, [r["prompt"] for r in chunk], [r["response"] for r in chunk], layers=layers,
                      aggregates=("response_avg",), max_batch=acts_cfg.batch_size,
                      token_budget=acts_cfg.batch_size * 1024, desc=f"activations {name}")
        parts.append(res.means["response_avg"].float().contiguous())
    acts = torch.cat(parts) if parts else torch.zeros(0, len(layers), loaded.hidden_size)
    save_vectors(tensor_path, {"response_avg": acts}, {
        "role": name, "model": loaded.label, "layers": layers, "num_layers": loaded.num_layers,
        "checkpoint": checkpoint, "positions": "response", "transcripts_sha256": source_sha})
    write_json(meta_path, keys)  # written last: its presence marks the role complete
    stats["captured"] = len(kept)
    return stats


def read_activations(d: Path, role: str) -> tuple[torch.Tensor, list[tuple], dict]:
    """``(response_avg [n, rows, H], keys per row, header)`` of one role; header values decoded."""
    from persona_ops.interp.vectors import decode_metadata, load_vectors

    tensor_path, meta_path = activation_paths(d, role)
    if not (tensor_path.exists() and meta_path.exists()):
        raise InputError(f"{tensor_path}: no activations for role {role!r}; run the activations stage first")
    tensors, raw = load_vectors(tensor_path)
    keys = [record_key(k) for k in read_json(meta_path)]
    acts = tensors["response_avg"]
    if acts.shape[0] != len(keys):
        raise InputError(f"{tensor_path}: {acts.shape[0]} rows but {len(keys)} entries in {meta_path}")
    return acts, keys, decode_metadata(raw)


ACTIVATION_PARAMS = ["persona_space.activations", "persona_space.space"]


@stage("role_activations", pipeline="persona-space", each="persona_space.roles.names", each_default=role_files,
       params=["persona_space.model", *ACTIVATION_PARAMS],
       inputs={"transcripts": Output("role_transcripts", "transcripts")},
       outputs={"activations": ROLE_ACTIVATIONS, "metadata": ROLE_METADATA}, persist=("activations", "metadata"))
def role_activations(cfg, io) -> dict:
    ps = cfg.persona_space
    loaded = io.model(ps.model)
    layers = capture_layers(ps.activations, ps.space, loaded.num_layers)
    stats = capture_role(loaded, io.item.name, io.input("transcripts"), io.output("activations"),
                         io.output("metadata"), ps.activations, layers)
    return {**stats, "layers": len(layers)}


@role_activations.validator
def _role_layers(cfg, io) -> None:
    capture_layers(cfg.persona_space.activations, cfg.persona_space.space, io.num_layers(cfg.persona_space.model))


@stage("checkpoint_activations", pipeline="trajectory", each="persona_space.trajectory.checkpoints",
       params=ACTIVATION_PARAMS, inputs={"transcripts": AllOutputs("role_transcripts", "transcripts")},
       outputs={"activations": OUT + "/checkpoints/{item}/activations"}, persist=("activations",))
def checkpoint_activations(cfg, io) -> dict:
    """Every role's reference transcripts through this checkpoint's model, into
    ``checkpoints/<label>/activations`` (the files of ``role_activations``)."""
    ps = cfg.persona_space
    transcripts = io.each("transcripts")
    loaded = io.model(io.item.value.model)
    layers = capture_layers(ps.activations, ps.space, loaded.num_layers)
    d = io.output("activations")
    d.mkdir(parents=True, exist_ok=True)
    totals = {"captured": 0, "skipped": 0, "empty": 0}
    for role, path in transcripts.items():
        stats = capture_role(loaded, role, path, *activation_paths(d, role), ps.activations, layers,
                             checkpoint=io.item.name)
        totals = {k: totals[k] + stats[k] for k in totals}
    return {"roles": len(transcripts), **totals, "layers": len(layers)}


@checkpoint_activations.validator
def _checkpoint_layers(cfg, io) -> None:
    ps = cfg.persona_space
    capture_layers(ps.activations, ps.space, io.num_layers(io.item.value.model))
