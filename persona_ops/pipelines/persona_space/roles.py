"""What the persona-space stages share: role names, record keys, the model's short name."""

from __future__ import annotations

from pathlib import Path

from persona_ops.data import DEFAULT_ROLE
from persona_ops.errors import InputError
from persona_ops.models.refs import EMBEDDED, EMBEDDED_ID, split_revision
from persona_ops.names import is_safe_name

OUT = "outputs/persona_space"
KEY_FIELDS = ("system_prompt_idx", "question_idx", "rollout_idx")


def role_files(params, root: Path) -> list[str]:
    """Every role of ``persona_space.roles.dir`` (what ``roles.names: null`` means), default first.
    Files whose names are not safe item names are refused."""
    d = Path(root) / params.persona_space.roles.dir
    names = sorted(p.stem for p in d.glob("*.json"))
    if not names:
        raise InputError(f"{d}: no role files (*.json)")
    bad = [n for n in names if not is_safe_name(n)]
    if bad:
        raise InputError(f"{d}: role files with names that cannot name stages or files: {bad}")
    if DEFAULT_ROLE not in names:
        raise InputError(f"{d}: no {DEFAULT_ROLE}.json (the Assistant Axis needs the default role)")
    return [DEFAULT_ROLE] + [n for n in names if n != DEFAULT_ROLE]


def model_short_name(roles, model) -> str:
    """``roles.model_name``, else the first word of the model id (``Qwen/Qwen3-32B`` -> ``Qwen3``)."""
    if roles.model_name:
        return roles.model_name
    name = split_revision(model.name)[0]
    name = EMBEDDED_ID if name == EMBEDDED else name
    return name.rstrip("/").split("/")[-1].split("-")[0] or name


def record_key(rec: dict) -> tuple[int, int, int]:
    return tuple(int(rec[k]) for k in KEY_FIELDS)  # type: ignore[return-value]
