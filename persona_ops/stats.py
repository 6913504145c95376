"""Seeded bootstrap confidence intervals for judged scores grouped by prompt.

Scores are resampled hierarchically: each bootstrap replicate draws prompts with
replacement, then scores with replacement within each drawn prompt, and takes the mean of
all drawn scores. The interval is the percentile interval of the replicate means; a paired
difference draws one set of prompts per replicate for both conditions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from persona_ops.errors import InputError

Groups = Sequence[Sequence[float | None]]

# Replicates are drawn in blocks so one (replicates, prompts, samples) draw stays ~32 MiB.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval ``[low, high]`` at ``level``.

    ``n_groups`` and ``n_samples`` count the prompts and scores used after dropping missing
    ones. For a difference they add up both sides, except that the prompts of a paired
    difference (shared by both sides) are counted once.
    """

    estimate: float
    low: float
    high: float
    level: float
    n_groups: int
    n_samples: int

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def bootstrap_mean(
    groups: Groups, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of all scores in ``groups`` (one sequence per prompt) with a hierarchical bootstrap interval.

    None and NaN scores are dropped, then empty groups. Raises ``InputError`` if no score is left.
    """
    _check_params(n_boot, level)
    kept = [g for g in _clean(groups, "groups") if g.size]
    if not kept:
        raise InputError("groups: no scores left after dropping None/NaN; need at least one")
    x, n = _pad(kept)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for lo, hi in _blocks(n_boot, x.size):
        idx = _draw_prompts(rng, len(kept), hi - lo)
        s, c = _draw_sums(rng, x, n, idx)
        stats[lo:hi] = s / c
    return _interval(np.concatenate(kept).mean(), stats, level, len(kept), int(n.sum()))


def bootstrap_diff(
    a: Groups,
    b: Groups,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    paired: bool = True,
) -> Interval:
    """``mean(a) - mean(b)`` over all scores, with a hierarchical bootstrap interval.

    ``paired=True``: ``a`` and ``b`` hold the same prompts in the same order; each replicate
    draws one set of prompts for both sides, then scores within each prompt independently per
    side. A prompt left empty on either side (after dropping None/NaN) is dropped from both.
    ``paired=False``: the prompts of ``a`` and ``b`` are resampled independently.
    """
    _check_params(n_boot, level)
    ca, cb = _clean(a, "a"), _clean(b, "b")
    if paired:
        if len(ca) != len(cb):
            raise InputError(
                f"paired difference needs the same prompts on both sides: a has {len(ca)} "
                f"groups, b has {len(cb)}; pass paired=False for unrelated prompts"
            )
        keep = [i for i in range(len(ca)) if ca[i].size and cb[i].size]
        if not keep:
            raise InputError("a, b: no prompt has scores on both sides after dropping None/NaN")
        ka, kb = [ca[i] for i in keep], [cb[i] for i in keep]
    else:
        ka, kb = [g for g in ca if g.size], [g for g in cb if g.size]
        for name, k in (("a", ka), ("b", kb)):
            if not k:
                raise InputError(f"{name}: no scores left after dropping None/NaN; need at least one")
    xa, na = _pad(ka)
    xb, nb = _pad(kb)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for lo, hi in _blocks(n_boot, xa.size + xb.size):
        idx_a = _draw_prompts(rng, len(ka), hi - lo)
        idx_b = idx_a if paired else _draw_prompts(rng, len(kb), hi - lo)
        sa, na_ = _draw_sums(rng, xa, na, idx_a)
        sb, nb_ = _draw_sums(rng, xb, nb, idx_b)
        stats[lo:hi] = sa / na_ - sb / nb_
    estimate = np.concatenate(ka).mean() - np.concatenate(kb).mean()
    n_groups = len(ka) if paired else len(ka) + len(kb)
    return _interval(estimate, stats, level, n_groups, int(na.sum() + nb.sum()))


def _check_params(n_boot: int, level: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise InputError(f"n_boot: expected a positive integer, got {n_boot!r}")
    if not (isinstance(level, (int, float)) and 0.0 < level < 1.0):
        raise InputError(f"level: expected a number strictly between 0 and 1, got {level!r}")


def _clean(groups: Groups, name: str) -> list[np.ndarray]:
    """Each group as a float array without None/NaN; empty groups are kept so prompts stay aligned."""
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise InputError(f"{name}: expected a sequence of groups of scores, got {type(groups).__name__}")
    out = []
    for i, group in enumerate(groups):
        if isinstance(group, (str, bytes)) or not isinstance(group, Iterable):
            raise InputError(
                f"{name}[{i}]: expected a sequence of scores (one per answer), got {group!r}"
            )
        vals = []
        for j, v in enumerate(group):
            if v is None:
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise InputError(f"{name}[{i}][{j}]: expected a number or None, got {v!r}") from None
            if math.isnan(f):
                continue
            if math.isinf(f):
                raise InputError(f"{name}[{i}][{j}]: expected a finite score, got {v!r}")
            vals.append(f)
        out.append(np.asarray(vals, dtype=np.float64))
    return out


def _pad(groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Non-empty groups as a zero-padded (prompts, max samples) matrix and their sizes."""
    n = np.array([g.size for g in groups], dtype=np.int64)
    x = np.zeros((len(groups), int(n.max())))
    for i, g in enumerate(groups):
        x[i, : g.size] = g
    return x, n


def _blocks(n_boot: int, cells: int) -> Iterable[tuple[int, int]]:
    step = max(1, _BLOCK_ELEMENTS // max(1, cells))
    for lo in range(0, n_boot, step):
        yield lo, min(n_boot, lo + step)


def _draw_prompts(rng: np.random.Generator, n_groups: int, n_rep: int) -> np.ndarray:
    """Prompt indices (replicates, prompts) drawn with replacement; a single prompt is always kept."""
    if n_groups == 1:
        return np.zeros((n_rep, 1), dtype=np.int64)
    return rng.integers(0, n_groups, size=(n_rep, n_groups))


def _draw_sums(
    rng: np.random.Generator, x: np.ndarray, n: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per replicate, the sum and count of scores drawn with replacement within the prompts ``idx``."""
    m = x.shape[1]
    k = n[idx][..., None]  # (replicates, prompts, 1): size of each drawn prompt
    pos = rng.integers(0, k, size=(*idx.shape, m))
    vals = x[idx[..., None], pos]
    # A prompt of size k contributes k draws; the padding columns beyond k are ignored.
    sums = np.where(np.arange(m) < k, vals, 0.0).sum(axis=(1, 2))
    return sums, k.sum(axis=(1, 2))


def _interval(estimate: float, stats: np.ndarray, level: float, n_groups: int, n_samples: int) -> Interval:
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(float(estimate), float(low), float(high), float(level), n_groups, n_samples)
