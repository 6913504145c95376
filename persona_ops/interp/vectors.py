"""Persona vectors: pair filtering, mean differences, and the on-disk formats.

A vector file is safetensors with one ``[num_layers+1, hidden]`` float32 tensor per
aggregate (``prompt_avg``, ``response_avg``, ``prompt_last``); row ``L`` is
``hidden_states[L]`` (0 = embeddings). The header's metadata holds the layer
convention, trait, model, sample counts and provenance (JSON strings).

Files are read as untrusted: any unreadable file, a tensor that is not a finite float
``[layers, hidden]`` and a name (trait, tensor) that is not a safe name before it becomes a
path are each one ``InputError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from persona_ops.errors import InputError
from persona_ops.io import atomic_path
from persona_ops.names import check_name

LAYER_CONVENTION = "row L = hidden_states[L]; 0 = embedding output, L>=1 = output of decoder block L-1"


class NotSafetensorsError(InputError):
    """A file that is not (or no longer, e.g. truncated) a safetensors file; ``reason`` says why."""

    def __init__(self, path: Path, reason: str):
        self.reason = reason
        super().__init__(f"{path}: not a safetensors file ({reason})")


class FilterThresholds(BaseModel):
    """Which judged pos/neg pairs a persona vector is made from (``persona_vectors.filter``);
    the defaults are persona_vectors' (50 / 50 / 50)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pos_min: float = 50.0
    neg_max: float = 50.0
    coherence_min: float = 50.0
    min_pairs: int = Field(1, ge=1)


def pair_key(rec: dict) -> tuple:
    return rec["instruction_idx"], rec["question_idx"], rec["sample_idx"]


def filter_pairs(records: list[dict], judgements: dict[str, dict], th: FilterThresholds,
                 ) -> tuple[list[tuple[dict, dict]], dict]:
    """Keep aligned (pos, neg) pairs where pos trait >= pos_min, neg trait < neg_max and both
    coherence >= coherence_min; a missing (None) score fails. Returns the pairs and counts.
    """
    by_key: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        by_key.setdefault(pair_key(rec), {})[rec["polarity"]] = rec

    def ok(rec: dict, trait_pass) -> bool:
        j = judgements.get(rec["id"], {})
        t, c = j.get("trait"), j.get("coherence")
        return bool(rec["answer"].strip()) and t is not None and c is not None \
            and trait_pass(t) and c >= th.coherence_min

    pairs, total = [], 0
    for key in sorted(by_key):
        pn = by_key[key]
        if "pos" not in pn or "neg" not in pn:
            continue
        total += 1
        if ok(pn["pos"], lambda t: t >= th.pos_min) and ok(pn["neg"], lambda t: t < th.neg_max):
            pairs.append((pn["pos"], pn["neg"]))
    return pairs, {"pairs_total": total, "pairs_passed": len(pairs), "pairs_filtered": total - len(pairs)}


def require_pairs(n_passed: int, n_total: int, th: FilterThresholds, trait: str) -> None:
    """Stop with a clear message rather than build a vector from too few samples."""
    if n_passed < th.min_pairs:
        raise InputError(
            f"{trait}: only {n_passed} of {n_total} pos/neg pairs passed the filter "
            f"(need persona_vectors.filter.min_pairs={th.min_pairs}). Thresholds: pos trait >= pos_min={th.pos_min}, "
            f"neg trait < neg_max={th.neg_max}, coherence >= coherence_min={th.coherence_min}. "
            "Lower a threshold (e.g. -S persona_vectors.filter.coherence_min=30), raise "
            "persona_vectors.generate.n_per_question, or use a stronger judge (persona_vectors.judge.backend=openai).")


def mean_difference(pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mean(pos) - mean(neg) over samples, per aggregate: ``[n, rows, h] -> [rows, h]``."""
    return {k: (pos[k].float().mean(0) - neg[k].float().mean(0)).contiguous() for k in pos}


def save_vectors(path: str | Path, vectors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically write vectors as safetensors; metadata values are JSON-encoded strings."""
    meta = {"layer_convention": LAYER_CONVENTION}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in vectors.items()}, str(tmp), metadata=meta)


def load_vectors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor (any shape and dtype) and the raw metadata of a safetensors file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a .safetensors file")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket), expected a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise NotSafetensorsError(path, (str(e).strip().splitlines() or [type(e).__name__])[0]) from None


def check_vector(path: str | Path, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a float32 persona vector ``[num_layers + 1, hidden]``; InputError if it is not one."""
    where = f"{path}: {name}"
    if not tensor.dtype.is_floating_point:
        raise InputError(f"{where}: dtype {str(tensor.dtype).removeprefix('torch.')}, expected floating point")
    shape = list(tensor.shape)
    if tensor.dim() != 2:
        raise InputError(f"{where}: shape {shape}, expected [layers, hidden] (row L = hidden_states[L])")
    if 0 in shape:
        raise InputError(f"{where}: shape {shape}, expected at least one layer and a hidden size above 0")
    tensor = tensor.float()
    if not torch.isfinite(tensor).all():
        raise InputError(f"{where}: NaN or infinite values, expected finite numbers")
    return tensor


def load_vector_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A persona vector file: its aggregates (each checked by :func:`check_vector`, one shape for all)
    and raw metadata."""
    tensors, meta = load_vectors(path)
    if not tensors:
        raise InputError(f"{path}: no tensors, expected one [layers, hidden] tensor per aggregate")
    vecs = {k: check_vector(path, k, v) for k, v in tensors.items()}
    shapes = {k: list(v.shape) for k, v in vecs.items()}
    if len({tuple(s) for s in shapes.values()}) > 1:
        raise InputError(f"{path}: aggregates of different shapes ({shapes}), expected one [layers, hidden]")
    return vecs, meta


def load_aggregate(path: str | Path, aggregate: str) -> torch.Tensor:
    """The ``[num_layers + 1, hidden]`` tensor of one aggregate of a vector file (float32, checked)."""
    vecs, _ = load_vectors(path)
    if aggregate not in vecs:
        raise InputError(f"{path}: no {aggregate!r} tensor (has {sorted(vecs)})")
    return check_vector(path, aggregate, vecs[aggregate])


def decode_metadata(raw: dict[str, str]) -> dict:
    """safetensors metadata as written by :func:`save_vectors`: JSON values decoded, plain strings kept."""
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def export_pt(vectors: dict[str, torch.Tensor], out_dir: str | Path, trait: str,
              source: str | Path | None = None) -> list[Path]:
    """Write persona_vectors' layout: ``{trait}_{aggregate}_diff.pt``, each ``[rows, hidden]``.

    These are plain tensors (loadable with ``torch.load(weights_only=True)``). ``trait`` and the
    aggregate names (often read from a file, ``source``) must be safe names: they become file names
    inside ``out_dir``, checked before anything is written.
    """
    where = str(source) if source is not None else None
    check_name(trait, "trait", where)
    for k, v in vectors.items():
        check_name(k, "tensor", where)
        check_vector(source or "vectors", k, v)
    paths = {k: Path(out_dir) / f"{trait}_{k}_diff.pt" for k in vectors}
    for k, p in paths.items():
        with atomic_path(p) as tmp:
            torch.save(vectors[k].clone(), tmp)
    return list(paths.values())


def import_pt(paths: list[str | Path]) -> dict[str, torch.Tensor]:
    """Read persona_vectors ``*_{aggregate}_diff.pt`` files (tensors only, never pickled objects)."""
    out = {}
    for p in map(Path, paths):
        try:
            t = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            reason = next((x for x in str(e).splitlines() if "GLOBAL" in x), str(e).strip().split("\n")[0])
            raise InputError(f"{p}: not a tensor file loadable with weights_only=True ({reason.strip()})") from None
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{p}: expected a 2-D tensor [num_layers+1, hidden], got {type(t).__name__}")
        stem = p.stem.removesuffix("_diff")
        kind = next((a for a in ("prompt_avg", "response_avg", "prompt_last") if stem.endswith(a)), stem)
        out[kind] = check_vector(p, kind, t)
    return out
