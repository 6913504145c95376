"""DVC, in process: which stage items are out of date, and committing the ones a run computed.

A pipeline run computes stage items itself (one process, models loaded once) and records them
in ``dvc.lock`` as ``dvc commit`` does, so DVC stays the one cache: a later ``dvc repro`` has
nothing to do, and an item DVC already has is never computed again. Both ask DVC about many
items at once: DVC parses ``dvc.yaml`` and ``dvc.lock`` (slow YAML) once per call, not per item.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from persona_ops.errors import TransientError

_LOCK_ERRORS = ("LockError", "Unable to acquire lock")


class Workspace:
    """A DVC repository opened once (``root`` holds ``.dvc/`` and ``dvc.yaml``)."""

    def __init__(self, root: Path):
        from dvc.repo import Repo

        self.root = Path(root).resolve()
        with self._locked(lock=False):
            self.repo = Repo(str(self.root))

    def stale(self, names: list[str]) -> set[str]:
        """The stage items among ``names`` (``generate@evil``) DVC does not have up to date."""
        with self._locked():
            stages = self._stages(names)
            return {n for n in names if stages[n].status()}

    def commit(self, names: list[str]) -> dict[str, dict]:
        """Record the items' current deps, params and outputs in dvc.lock (and the cache), in one
        write; return their lock entries."""
        if not names:
            return {}
        with self._locked():
            stages = self._stages(names)
            for name in names:
                stages[name].save()
                stages[name].commit()
            stages[names[0]].dvcfile.dump_stages([stages[n] for n in names], update_pipeline=False)
        entries = lock_entries(self.root)
        return {n: entries.get(n) or {} for n in names}

    def close(self) -> None:
        self.repo.close()

    def _stages(self, names: list[str]) -> dict:
        self.repo._reset()  # the lock may have changed since the last call
        found = {s.addressing: s for s in self.repo.index.stages}
        missing = [n for n in names if n not in found]
        if missing:
            raise KeyError(f"dvc.yaml has no stage {missing[0]!r} (regenerate it: persona-ops dvc-yaml)")
        return found

    @contextlib.contextmanager
    def _locked(self, lock: bool = True):
        """In the repository's directory (DVC resolves paths against it), under DVC's lock; the lock
        held by another dvc process is a transient error, worth a retry."""
        cwd = os.getcwd()
        try:
            os.chdir(self.root)
            with (self.repo.lock if lock else contextlib.nullcontext()):
                yield
        except Exception as e:  # dvc.exceptions.LockError and friends
            if type(e).__name__ in _LOCK_ERRORS or any(m in str(e) for m in _LOCK_ERRORS):
                raise TransientError(f"DVC is busy (another dvc process holds its lock): {e}") from e
            raise
        finally:
            os.chdir(cwd)


def lock_entries(root: Path) -> dict[str, dict]:
    """Every stage item's ``dvc.lock`` entry, by name."""
    import yaml

    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return (yaml.load(lock.read_text(encoding="utf-8"), Loader=loader) or {}).get("stages") or {}


def md5s(entry: dict) -> dict[str, str]:
    """``path -> md5`` of a lock entry's deps and outputs."""
    return {e["path"]: str(e["md5"]) for key in ("deps", "outs") for e in entry.get(key) or []
            if isinstance(e, dict) and e.get("path") and e.get("md5")}
