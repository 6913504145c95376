"""Parameters and tags as MLflow takes them: flattened, stringified and clipped to its limits;
names that look like credentials (key, token, secret, password) never reach MLflow."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

SECRET_MARKERS = ("key", "token", "secret", "password")
# Lineage tag keys embed file paths; a path is never a secret, so these skip the secret filter.
_LINEAGE_PREFIXES = ("input.", "dvc.")


def is_secret(key: str) -> bool:
    """Whether a parameter name looks like it holds a credential."""
    k = key.lower()
    return any(m in k for m in SECRET_MARKERS)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str, separators=(",", ":"))
    return str(v)


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fit_key(key: str) -> str:
    """Keep keys within MLflow's limit; an over-long key keeps a hash so it stays unique."""
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return key[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + digest


def clean_params(params: Mapping[str, Any] | None) -> dict[str, str]:
    """Flatten, drop secrets, stringify and truncate parameters to MLflow's limits."""
    out: dict[str, str] = {}
    for k, v in flatten(params or {}).items():
        if is_secret(k):
            continue
        out[_fit_key(k)] = _clip(_to_str(v), MAX_PARAM_VAL_LENGTH)
    return out


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Like :func:`clean_params` for tags; lineage tags (``input.*``, ``dvc.*``) are kept."""
    out: dict[str, str] = {}
    for k, v in flatten(tags or {}).items():
        if v is None or (is_secret(k) and not k.startswith(_LINEAGE_PREFIXES)):
            continue
        out[_fit_key(k)] = _clip(_to_str(v), MAX_TAG_VAL_LENGTH)
    return out
