"""Turning a judge's distribution over numeric answers into one score.

The score is the probability-weighted mean of the integer answers ``k`` in
``[lo, hi]``: ``sum(k * p_k) / sum(p_k)``. When the numeric mass ``sum(p_k)`` is
below ``min_mass`` the judge refused or answered something unusable, and the
score is ``None``. The same code serves the 0-100 trait/coherence scale and the
0-3 role-expression scale.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

MIN_MASS = 0.25
_INT_RE = re.compile(r"-?[0-9]+")  # ASCII digits only: int() would also accept "1_0", "٣" or "+5"


def parse_int(text: str) -> int | None:
    """The integer a token's stripped text spells, or None if it is not a plain integer."""
    text = text.strip()
    return int(text) if _INT_RE.fullmatch(text) else None


def aggregate_score(probs: Mapping[int, float], lo: int = 0, hi: int = 100,
                    min_mass: float = MIN_MASS) -> float | None:
    """Probability-weighted mean of integer answers in ``[lo, hi]``; None if their mass < ``min_mass``."""
    mass = 0.0
    total = 0.0
    for k, p in probs.items():
        k = int(k)
        if lo <= k <= hi and p > 0:
            mass += p
            total += k * p
    if mass < min_mass or mass <= 0:
        return None
    return total / mass


def numeric_probs(top: Mapping[str, float] | Iterable[tuple[str, float]], lo: int = 0,
                  hi: int = 100) -> dict[int, float]:
    """Probability per integer in ``[lo, hi]`` from token -> logprob.

    ``top`` is a mapping or (token, logprob) pairs; tokens spelling the same number
    (``"7"`` and ``" 7"``) add up.
    """
    pairs = top.items() if isinstance(top, Mapping) else top
    probs: dict[int, float] = {}
    for token, logprob in pairs:
        k = parse_int(token)
        if k is not None and lo <= k <= hi:
            probs[k] = probs.get(k, 0.0) + math.exp(logprob)
    return probs


def aggregate_token_logprobs(top: Mapping[str, float] | Iterable[tuple[str, float]], lo: int = 0, hi: int = 100,
                             min_mass: float = MIN_MASS) -> float | None:
    """Score from OpenAI-style top logprobs of the first answer token (token text -> logprob)."""
    return aggregate_score(numeric_probs(top, lo, hi), lo, hi, min_mass)
