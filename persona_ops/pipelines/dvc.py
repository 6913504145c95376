"""DVC, in process: which stage items are out of date, and committing the ones a run computed.

A pipeline run computes stage items itself (one process, models loaded once) and records each
in ``dvc.lock`` with ``dvc commit``, so DVC stays the one cache: a later ``dvc repro`` has
nothing to do, and an item DVC already has is never computed again.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from persona_ops.errors import TransientError

_LOCK_ERRORS = ("LockError", "Unable to acquire lock")


class Workspace:
    """A DVC repository opened once (``root`` holds ``.dvc/`` and ``dvc.yaml``)."""

    def __init__(self, root: Path):
        from dvc.repo import Repo

        self.root = Path(root)
        with _transient():
            self.repo = Repo(str(self.root))

    def is_current(self, name: str) -> bool:
        """Whether DVC has stage item ``name`` (``generate@evil``) up to date."""
        with _transient():
            return not self.repo.status(targets=[name])

    def commit(self, name: str) -> dict:
        """Record the item's current deps, params and outputs in dvc.lock (and the cache);
        return its lock entry."""
        with _transient():
            self.repo.commit(name, force=True)
        return lock_entry(self.root, name)

    def close(self) -> None:
        self.repo.close()


@contextlib.contextmanager
def _transient():
    """DVC's lock held by another process is worth a retry, not a failure."""
    try:
        yield
    except Exception as e:  # dvc.exceptions.LockError and friends
        if type(e).__name__ in _LOCK_ERRORS or any(m in str(e) for m in _LOCK_ERRORS):
            raise TransientError(f"DVC is busy (another dvc process holds its lock): {e}") from e
        raise


def lock_entry(root: Path, name: str) -> dict:
    """The ``dvc.lock`` entry of stage item ``name`` (empty when it has none)."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
    return stages.get(name) or {}


def md5s(entry: dict) -> dict[str, str]:
    """``path -> md5`` of a lock entry's deps and outputs."""
    return {e["path"]: str(e["md5"]) for key in ("deps", "outs") for e in entry.get(key) or []
            if isinstance(e, dict) and e.get("path") and e.get("md5")}
