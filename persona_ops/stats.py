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
    return bootstrap_mean_over([groups], n_boot=n_boot, level=level, seed=seed)


def bootstrap_mean_over(
    units: Sequence[Groups], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of all scores of ``units`` (e.g. training seeds), each a sequence of prompt groups,
    with a three-level bootstrap: units, then prompts within each drawn unit, then scores. One
    unit is :func:`bootstrap_mean` exactly (same draws)."""
    _check_params(n_boot, level)
    names = ["groups"] if len(units) == 1 else [f"units[{i}]" for i in range(len(units))]
    kept = [u for u in ([g for g in _clean(x, name) if g.size] for name, x in zip(names, units)) if u]
    if not kept:
        raise InputError("groups: no scores left after dropping None/NaN; need at least one")
    stats = _replicates([kept], n_boot, seed, paired=True)
    scores = np.concatenate([g for u in kept for g in u])
    return _interval(scores.mean(), stats, level, sum(map(len, kept)), scores.size)


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
    return bootstrap_diff_over([a], [b], n_boot=n_boot, level=level, seed=seed, paired=paired)


def bootstrap_diff_over(
    a: Sequence[Groups],
    b: Sequence[Groups],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    paired: bool = True,
) -> Interval:
    """``mean(a) - mean(b)`` over the scores of units (e.g. seeds: ``a[i]`` and ``b[i]`` are one
    unit's prompt groups under two conditions): each replicate draws the units once for both
    sides, then prompts within each drawn unit (shared by both sides when ``paired``), then
    scores. One unit is :func:`bootstrap_diff` exactly."""
    _check_params(n_boot, level)
    if len(a) != len(b):
        raise InputError(f"a has {len(a)} units, b has {len(b)}; the same units are needed on both sides")
    sides: tuple[list, list] = ([], [])
    empty = {"a": True, "b": True}
    for i, (ua, ub) in enumerate(zip(a, b)):
        ca, cb = _clean(ua, "a" if len(a) == 1 else f"a[{i}]"), _clean(ub, "b" if len(b) == 1 else f"b[{i}]")
        if paired:
            if len(ca) != len(cb):
                raise InputError(
                    f"paired difference needs the same prompts on both sides: a has {len(ca)} "
                    f"groups, b has {len(cb)}; pass paired=False for unrelated prompts"
                )
            keep = [j for j in range(len(ca)) if ca[j].size and cb[j].size]
            ka, kb = [ca[j] for j in keep], [cb[j] for j in keep]
        else:
            ka, kb = [g for g in ca if g.size], [g for g in cb if g.size]
        empty["a"] &= not ka
        empty["b"] &= not kb
        if ka and kb:
            sides[0].append(ka)
            sides[1].append(kb)
    if not sides[0]:
        if paired:
            raise InputError("a, b: no prompt has scores on both sides after dropping None/NaN")
        name = "a" if empty["a"] else "b" if empty["b"] else "a, b"
        raise InputError(f"{name}: no scores left after dropping None/NaN (in any unit with scores on both sides)")
    stats = _replicates(list(sides), n_boot, seed, paired)
    sa, sb = (np.concatenate([g for u in side for g in u]) for side in sides)
    n_groups = sum(map(len, sides[0])) + (0 if paired else sum(map(len, sides[1])))  # shared prompts once
    return _interval(sa.mean() - sb.mean(), stats, level, n_groups, sa.size + sb.size)


def _replicates(sides: list[list[list[np.ndarray]]], n_boot: int, seed: int, paired: bool) -> np.ndarray:
    """Bootstrap replicates of ``mean(side 0) - mean(side 1)`` (or of ``mean(side 0)`` alone):
    per replicate the units are drawn once for every side; within each drawn unit the prompts
    (one draw for all sides when ``paired``), then the scores within each prompt."""
    padded = [[_pad(u) for u in side] for side in sides]
    n_units = len(padded[0])
    cells = sum(x.size for side in padded for x, _ in side)
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    for lo, hi in _blocks(n_boot, cells):
        n_rep = hi - lo
        units = _draw_prompts(rng, n_units, n_rep)
        sums, counts = np.zeros((len(sides), n_rep)), np.zeros((len(sides), n_rep))
        for slot in range(units.shape[1]):
            for u in range(n_units):
                rows = np.flatnonzero(units[:, slot] == u)
                if not rows.size:
                    continue
                idx = None
                for k, side in enumerate(padded):
                    x, n = side[u]
                    if idx is None or not paired:
                        idx = _draw_prompts(rng, len(n), rows.size)
                    s, c = _draw_sums(rng, x, n, idx)
                    sums[k, rows] += s
                    counts[k, rows] += c
        means = sums / counts
        stats[lo:hi] = means[0] - means[1] if len(sides) == 2 else means[0]
    return stats


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
