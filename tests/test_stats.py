"""Bootstrap intervals: determinism, missing scores, widths against theory, pairing, coverage, units (seeds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from persona_ops.errors import InputError
from persona_ops.stats import Interval, bootstrap_diff, bootstrap_diff_over, bootstrap_mean, bootstrap_mean_over


def _normal_groups(rng: np.random.Generator, n_groups: int, per_group: int, between: float, within: float,
                   mean: float = 0.0) -> list[list[float]]:
    offsets = rng.normal(mean, between, size=n_groups)
    return [list(o + rng.normal(0.0, within, size=per_group)) for o in offsets]


def _width(iv: Interval) -> float:
    return iv.high - iv.low


def test_same_seed_same_interval_other_seed_differs():
    groups = _normal_groups(np.random.default_rng(1), 20, 3, 1.0, 1.0)
    first, again = bootstrap_mean(groups, seed=7), bootstrap_mean(groups, seed=7)
    assert first == again
    other = bootstrap_mean(groups, seed=8)
    assert other.estimate == first.estimate
    assert (other.low, other.high) != (first.low, first.high)


def test_none_nan_and_empty_groups_are_dropped():
    clean = [[1.0, 2.0], [3.0], [4.0, 6.0, 5.0]]
    dirty = [[1.0, None, 2.0], [None, float("nan")], [3.0, np.nan], [], [4.0, 6.0, None, 5.0]]
    got, want = bootstrap_mean(dirty, seed=3), bootstrap_mean(clean, seed=3)
    assert got == want
    assert (got.n_groups, got.n_samples) == (3, 6)


def test_estimate_is_mean_over_all_samples():
    groups = [[1.0], [2.0, 4.0, 6.0], [10.0, 0.0]]
    iv = bootstrap_mean(groups)
    assert iv.estimate == pytest.approx(23.0 / 6.0)  # the mean of samples, not of prompt means
    assert iv.low <= iv.estimate <= iv.high
    assert iv.level == 0.95


def test_unequal_group_sizes_centre_the_interval_on_the_estimate():
    # Prompts of 1 and of 20 scores share one padded matrix: each must count only its own draws.
    rng = np.random.default_rng(10)
    groups = [list(rng.normal(5.0, 1.0, size=1 if i % 2 else 20)) for i in range(60)]
    iv = bootstrap_mean(groups, n_boot=2000)
    half = _width(iv) / 2
    assert abs((iv.low + iv.high) / 2 - iv.estimate) < 0.2 * half


def test_one_value_gives_a_point_interval():
    iv = bootstrap_mean([[None], [2.5]])
    assert (iv.estimate, iv.low, iv.high) == (2.5, 2.5, 2.5)
    assert (iv.n_groups, iv.n_samples) == (1, 1)


def test_interval_contains_estimate_and_narrows_with_more_prompts():
    rng = np.random.default_rng(2)
    widths = []
    for n_groups in (10, 40, 160):
        iv = bootstrap_mean(_normal_groups(rng, n_groups, 3, 1.0, 0.5))
        assert iv.low < iv.estimate < iv.high
        widths.append(_width(iv))
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]  # ~halves for 4x the prompts


def test_width_matches_normal_theory_for_iid_prompts():
    n = 2000
    x = np.random.default_rng(3).normal(0.0, 2.0, size=n)
    iv = bootstrap_mean([[v] for v in x], n_boot=2000)
    expected = 2 * 1.96 * x.std(ddof=1) / math.sqrt(n)
    assert _width(iv) == pytest.approx(expected, rel=0.15)


def test_single_group_resamples_samples():
    x = np.random.default_rng(4).normal(5.0, 1.0, size=400)
    iv = bootstrap_mean([list(x)], n_boot=2000)
    expected = 2 * 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert _width(iv) == pytest.approx(expected, rel=0.15)
    assert iv.n_groups == 1


def test_hierarchical_resampling_keeps_between_prompt_variance():
    # All variance is between prompts: 10 identical scores per prompt.
    rng = np.random.default_rng(5)
    groups = [[c] * 10 for c in rng.normal(0.0, 1.0, size=50)]
    ours = bootstrap_mean(groups, n_boot=2000)

    # Resampling the 500 scores as if independent understates the uncertainty ~sqrt(10)-fold.
    flat = np.concatenate(groups)
    draws = np.random.default_rng(0).choice(flat, size=(2000, flat.size)).mean(axis=1)
    flat_low, flat_high = np.quantile(draws, [0.025, 0.975])
    assert _width(ours) > 2.0 * (flat_high - flat_low)
    assert _width(ours) == pytest.approx(2 * 1.96 * np.std([g[0] for g in groups], ddof=1) / math.sqrt(50),
                                         rel=0.2)


def test_paired_difference_of_identical_inputs_is_exactly_zero():
    rng = np.random.default_rng(6)
    single = [[v] for v in rng.normal(size=30)]
    iv = bootstrap_diff(single, single)
    assert (iv.estimate, iv.low, iv.high) == (0.0, 0.0, 0.0)
    # Several scores per prompt, all equal within a prompt: the within-prompt draws cannot differ.
    constant = [[c] * 4 for c in rng.normal(size=30)]
    assert (bootstrap_diff(constant, constant).low, bootstrap_diff(constant, constant).high) == (0.0, 0.0)
    # Unpaired, the same inputs are resampled independently and the interval is wide.
    assert _width(bootstrap_diff(single, single, paired=False)) > 0.3


def test_pairing_cancels_a_shared_prompt_offset():
    rng = np.random.default_rng(7)
    offsets = rng.normal(0.0, 5.0, size=40)
    a = [list(o + 1.0 + rng.normal(0.0, 0.5, size=3)) for o in offsets]
    b = [list(o + rng.normal(0.0, 0.5, size=3)) for o in offsets]
    paired = bootstrap_diff(a, b)
    unpaired = bootstrap_diff(a, b, paired=False)
    assert paired.estimate == unpaired.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert paired.low < 1.0 < paired.high
    assert _width(paired) < 0.2 * _width(unpaired)
    assert (paired.n_groups, unpaired.n_groups, paired.n_samples) == (40, 80, 240)


def test_paired_drops_prompts_empty_on_either_side():
    a = [[1.0, 2.0], [None], [3.0], [4.0, 5.0]]
    b = [[0.5], [7.0], [float("nan")], [2.0, None, 1.0]]
    got = bootstrap_diff(a, b, seed=2)
    want = bootstrap_diff([[1.0, 2.0], [4.0, 5.0]], [[0.5], [2.0, 1.0]], seed=2)
    assert got == want
    assert got.estimate == pytest.approx(3.0 - 3.5 / 3)
    assert (got.n_groups, got.n_samples) == (2, 7)


def test_unpaired_allows_different_prompt_counts():
    rng = np.random.default_rng(8)
    iv = bootstrap_diff(_normal_groups(rng, 30, 2, 1.0, 1.0, mean=1.0), _normal_groups(rng, 20, 3, 1.0, 1.0),
                        paired=False)
    assert iv.low < iv.estimate < iv.high
    assert (iv.n_groups, iv.n_samples) == (50, 120)


def test_coverage_of_90_percent_interval():
    rng = np.random.default_rng(9)
    true_mean, covered, n_sets = 3.0, 0, 200
    for i in range(n_sets):
        iv = bootstrap_mean(_normal_groups(rng, 30, 4, 1.0, 0.5, mean=true_mean), n_boot=500, level=0.9, seed=i)
        covered += iv.low <= true_mean <= iv.high
    assert 0.80 * n_sets <= covered <= 0.97 * n_sets


def test_as_dict_is_json_ready():
    iv = bootstrap_mean([[1.0, 2.0], [3.0]], n_boot=50)
    d = json.loads(json.dumps(iv.as_dict()))
    assert d == {"estimate": 2.0, "low": iv.low, "high": iv.high, "level": 0.95, "n_groups": 2, "n_samples": 3}


@pytest.mark.parametrize("groups", [[], [[]], [[None, float("nan")], []]])
def test_no_data_is_an_input_error(groups):
    with pytest.raises(InputError, match="no scores"):
        bootstrap_mean(groups)


def test_bad_inputs_are_input_errors():
    with pytest.raises(InputError, match="same prompts"):
        bootstrap_diff([[1.0], [2.0]], [[1.0]])
    with pytest.raises(InputError, match="both sides"):
        bootstrap_diff([[1.0], [None]], [[None], [2.0]])
    with pytest.raises(InputError, match="b: no scores"):
        bootstrap_diff([[1.0]], [[None]], paired=False)
    with pytest.raises(InputError, match=r"groups\[0\]"):
        bootstrap_mean([1.0, 2.0])  # flat list: scores not grouped by prompt
    with pytest.raises(InputError, match=r"groups\[1\]\[0\]"):
        bootstrap_mean([[1.0], ["high"]])
    with pytest.raises(InputError, match="level"):
        bootstrap_mean([[1.0]], level=95)
    with pytest.raises(InputError, match="n_boot"):
        bootstrap_mean([[1.0]], n_boot=0)


def test_units_keep_between_unit_variance():
    """Seeds that disagree widen the interval: resampling seeds, not only questions pooled across them."""
    rng = np.random.default_rng(3)
    units = [[list(offset + rng.normal(size=5)) for _ in range(20)] for offset in (0.0, 10.0, 20.0)]
    pooled = [sum((u[q] for u in units), []) for q in range(20)]  # one group per question across seeds
    nested = bootstrap_mean_over(units, n_boot=2000, seed=0)
    flat = bootstrap_mean(pooled, n_boot=2000, seed=0)
    assert nested.estimate == pytest.approx(flat.estimate)
    assert nested.high - nested.low > 5 * (flat.high - flat.low)
    assert (nested.n_groups, nested.n_samples) == (60, 300)


def test_paired_units_cancel_a_shared_seed_offset():
    rng = np.random.default_rng(4)
    b = [[list(offset + rng.normal(size=4)) for _ in range(15)] for offset in (0.0, 30.0)]
    a = [[[v + 1.0 for v in g] for g in unit] for unit in b]
    ci = bootstrap_diff_over(a, b, n_boot=1000, seed=0)
    assert ci.estimate == pytest.approx(1.0)
    assert ci.low < 1.0 < ci.high and ci.high - ci.low < 2.0  # seeds drawn apart per side: width ~30
    with pytest.raises(InputError, match="same units"):
        bootstrap_diff_over(a, b[:1])

