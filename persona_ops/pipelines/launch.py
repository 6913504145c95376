"""Getting a checkout ready for a pipeline run: the run's params written into params.yaml (in
place, comments kept, as ``dvc exp run -S`` does), the lists DVC needs written out, and
``dvc.yaml`` regenerated when the declarations or params changed it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_ops.io import atomic_path, write_text
from persona_ops.pipelines import registry
from persona_ops.pipelines.params import (
    Params,
    apply_overrides,
    edit_params_file,
    parse_override,
    read_params_data,
    validate_params,
)


def _leaf_changes(old: Any, new: Any, keys: list[str]) -> list[tuple[list[str], Any]]:
    """The (keys, value) edits turning ``old`` into ``new`` (mappings compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k, v in new.items():
            out += _leaf_changes(old.get(k), v, keys + [k]) if k in old else [(keys + [k], v)]
        return out
    return [] if old == new else [(keys, new)]


def _expansions(params: Params, root: Path) -> list[tuple[list[str], Any]]:
    """What DVC needs spelled out in params.yaml: item lists given as null (every role file) and
    a per-item overrides entry for every item of a stage that has them."""
    changes = []
    for stage in registry.STAGES.values():
        spec = stage.items
        if spec and spec.each and spec.default and registry.lookup(params, spec.each) is None:
            changes.append((spec.each.split("."), spec.default(params, root)))
        if stage.per_item:
            present = registry.lookup(params, stage.per_item)
            for item in registry.items(stage, params, root):
                if item.name not in present:
                    changes.append((stage.per_item.split(".") + [item.name], {}))
    return list({tuple(k): (k, v) for k, v in changes}.values())


def prepare(root: Path, sections: dict[str, Any] | None = None, overrides: list[str] = (),
            write: bool = True) -> Params:
    """Write a run's parameters into ``<root>/params.yaml`` and return them validated.

    ``sections``: whole sections (a Prefect flow's typed parameter; only the values that differ
    from params.yaml are written); ``overrides``: ``-S key=value`` strings. Then item lists DVC
    needs are written out and ``dvc.yaml`` is regenerated if it changed. ``write=False``: only
    the validated parameters, nothing written."""
    root = Path(root)
    path = root / "params.yaml"
    data = read_params_data(path)
    current = validate_params(data, str(path))
    changes: list[tuple[list[str], Any]] = []
    for name, value in (sections or {}).items():
        new = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
        changes += _leaf_changes(getattr(current, name).model_dump(mode="json"), new, [name])
    changes += [parse_override(text) for text in overrides]
    data = _apply(data, changes)
    params = validate_params(data, "run parameters")
    expand = _expansions(params, root)
    if expand:
        params = validate_params(_apply(data, expand), "run parameters")
    if not write:
        return params
    if changes or expand:
        edit_params_file(path, changes + expand)
    write_dvc_yaml(root, params)
    return params


class restored_on_error:
    """Put params.yaml and dvc.yaml back as they were when the block raises: a run whose
    parameters are rejected leaves nothing of them behind for the next ``dvc repro``."""

    FILES = ("params.yaml", "dvc.yaml")

    def __init__(self, root: Path):
        self.saved = {f: (Path(root) / f).read_bytes() for f in self.FILES if (Path(root) / f).is_file()}
        self.root = Path(root)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            return
        for name, data in self.saved.items():
            if (self.root / name).read_bytes() != data:
                with atomic_path(self.root / name) as tmp:
                    tmp.write_bytes(data)


def _apply(data: dict, changes: list[tuple[list[str], Any]]) -> dict:
    import json

    return apply_overrides(data, [f"{'.'.join(k)}={json.dumps(v)}" for k, v in changes])


def write_dvc_yaml(root: Path, params: Params) -> bool:
    """Regenerate ``dvc.yaml``; return whether it changed."""
    path = Path(root) / "dvc.yaml"
    text = registry.dvc_yaml_text(params, root)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return False
    write_text(path, text)
    return True
