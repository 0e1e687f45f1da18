"""The statistics protocol (sweeps/stats.py) three ways: hand-worked values, hypothesis properties, and independent
references (the exact bootstrap distribution enumerated over every resample; numpy's trapezoid on a fine grid)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sweeps.stats import (
    Interval,
    bootstrap,
    bootstrap_difference,
    first_crossing,
    interpolate,
    normalised_auc,
    rollouts_to_target,
    smooth,
    spread,
)

accuracies = st.floats(0.0, 1.0, allow_nan=False, width=32)


# --- hand-worked -------------------------------------------------------------------------------------------------

def test_bootstrap_of_two_seeds_by_hand() -> None:
    # Seeds [0, 1]: a resample of 2 is (0,0), (0,1), (1,0), (1,1) -> means 0, 0.5, 0.5, 1 with probabilities
    # 1/4, 1/2, 1/4. The 2.5% and 97.5% quantiles are 0 and 1 (each end holds 25% > 2.5%).
    ci = bootstrap([0.0, 1.0])
    assert (ci.estimate, ci.low, ci.high) == (0.5, 0.0, 1.0)
    # A 40% interval asks for the 30% and 70% quantiles: both fall in the 0.5 atom (P(< 0.5) = 0.25, P(<= 0.5) = 0.75).
    ci = bootstrap([0.0, 1.0], level=0.4)
    assert (ci.low, ci.high) == (0.5, 0.5)


def test_bootstrap_degenerate_cases() -> None:
    assert bootstrap([0.3, 0.3, 0.3]) == Interval(pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))
    one = bootstrap([0.7])  # one seed: a value, no interval (as mean_std has no std)
    assert one.estimate == 0.7 and math.isnan(one.low) and math.isnan(one.high)
    assert all(math.isnan(v) for v in (bootstrap([]).estimate, bootstrap([]).low))
    assert not one.excludes_zero()
    with pytest.raises(ValueError, match="nan"):
        bootstrap([0.1, math.nan])
    with pytest.raises(ValueError, match="level"):
        bootstrap([0.1, 0.2], level=1.0)


def test_bootstrap_median_of_censored_seeds() -> None:
    # Rollouts to target of 5 seeds, two never reach it (+inf): the median is the 3rd value, 1200.
    ci = bootstrap([400.0, 800.0, 1200.0, math.inf, math.inf], statistic="median")
    assert ci.estimate == 1200.0
    assert ci.low == 400.0 and ci.high == math.inf  # a resample with 3+ censored seeds has an infinite median


def test_difference_by_hand() -> None:
    # a = [1, 1], b = [0, 0]: every resample's difference is 1.
    d = bootstrap_difference([1.0, 1.0], [0.0, 0.0])
    assert (d.estimate, d.low, d.high) == (1.0, 1.0, 1.0) and d.excludes_zero()
    # a = [0, 1] against constant b = [0, 0]: the difference is a's resampled mean, as bootstrap([0, 1]).
    d = bootstrap_difference([0.0, 1.0], [0.0, 0.0])
    assert (d.estimate, d.low, d.high) == (0.5, 0.0, 1.0) and not d.excludes_zero()
    assert math.isnan(bootstrap_difference([0.4], [0.1, 0.2]).low)  # one seed: no interval


def test_smooth_by_hand() -> None:
    curve = [(10, 0.0), (20, 0.3), (30, 0.6), (40, 0.3)]
    # window 3, trailing: 0, (0 + .3) / 2, (0 + .3 + .6) / 3, (.3 + .6 + .3) / 3 -- never a later point
    assert [v for _, v in smooth(curve, 3)] == pytest.approx([0.0, 0.15, 0.3, 0.4])
    assert [v for _, v in smooth(curve, 2)] == pytest.approx([0.0, 0.15, 0.45, 0.45])
    assert smooth(curve, 1) == curve
    with pytest.raises(ValueError, match=">= 1"):
        smooth(curve, 0)


def test_rollouts_to_target_by_hand() -> None:
    # One lucky validation (0.6 at 1600) does not count: smoothed 0, 0.3, 0.2, 0.233, 0.367 -> reaches 0.35 at 4000
    curve = [(800, 0.0), (1600, 0.6), (2400, 0.0), (3200, 0.1), (4000, 1.0)]
    assert rollouts_to_target(curve, 0.35) == 4000
    assert first_crossing(curve, 0.35) == 1600  # the raw crossing the smoothing removes
    # Causal: a jump at the next validation does not credit this one (a centred window reached 0.4 at 1600 because
    # of the 0.9 at 2400; trailing: 0, 0.15, 0.4)
    assert rollouts_to_target([(800, 0.0), (1600, 0.3), (2400, 0.9)], 0.4) == 2400
    assert rollouts_to_target(curve, 0.9) == math.inf


def test_auc_by_hand() -> None:
    curve = [(0, 0.0), (800, 0.4), (1600, 0.4), (2400, 0.8)]
    # [0, 1600]: triangle 800 x 0.4 / 2 = 160 + rectangle 800 x 0.4 = 320 -> 480 / 1600 = 0.3
    assert normalised_auc(curve, 1600) == pytest.approx(0.3)
    # [0, 2000]: + trapezoid 400 x (0.4 + 0.6) / 2 = 200 -> 680 / 2000 = 0.34 (0.6 interpolated at 2000)
    assert normalised_auc(curve, 2000) == pytest.approx(0.34)
    assert interpolate(curve, 2000) == pytest.approx(0.6)
    # [800, 1600]: flat 0.4
    assert normalised_auc(curve, 1600, start=800) == pytest.approx(0.4)
    assert math.isnan(normalised_auc(curve, 3000))  # the run ended before the budget
    assert math.isnan(normalised_auc(curve[1:], 1600))  # no point at 0: the window is not covered


def test_spread_by_hand() -> None:
    s = spread([0.375, 0.3, 0.15, 0.2, 0.3], floor=0.25)
    assert s.seeds == 5 and s.worst == 0.15 and s.collapsed == 2  # 0.15 and 0.2 end below 0.25
    assert s.mean.estimate == pytest.approx(0.265)
    assert spread([0.3, 0.25], floor=0.25).collapsed == 0  # at the floor is not below it
    assert spread([0.1, 0.2]).collapsed == 0  # no floor given


# --- properties --------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(center=accuracies, half=st.lists(st.floats(0.0, 0.5, allow_nan=False, width=32), min_size=1, max_size=4),
       middle=st.booleans())
def test_interval_of_symmetric_data_contains_its_mean(center: float, half: list[float], middle: bool) -> None:
    # Data mirrored around `center`: the exact bootstrap distribution of the mean is symmetric about it, so any
    # central interval contains it (each tail holds at most half the mass).
    values = [center + h for h in half] + [center - h for h in half] + ([center] if middle else [])
    ci = bootstrap(values, resamples=2000)
    assert ci.low - 1e-9 <= ci.estimate <= ci.high + 1e-9
    assert ci.estimate == pytest.approx(center, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(accuracies, min_size=2, max_size=8), data=st.data())
def test_interval_does_not_depend_on_the_seeds_order(values: list[float], data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(values))
    assert bootstrap(values, resamples=1000) == bootstrap(shuffled, resamples=1000)
    other = data.draw(st.permutations(values))
    assert bootstrap_difference(values, other, resamples=500) == bootstrap_difference(shuffled, values, resamples=500)


@settings(max_examples=40, deadline=None)
@given(values=st.lists(accuracies, min_size=2, max_size=8), shift=st.floats(-1, 1, allow_nan=False, width=32))
def test_interval_lies_in_the_data_range_and_moves_with_a_shift(values: list[float], shift: float) -> None:
    ci = bootstrap(values, resamples=1000)
    assert min(values) - 1e-9 <= ci.low <= ci.high <= max(values) + 1e-9
    moved = bootstrap([v + shift for v in values], resamples=1000)
    assert (moved.low, moved.high) == pytest.approx((ci.low + shift, ci.high + shift), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(ys=st.lists(accuracies, min_size=2, max_size=10), budget_frac=st.floats(0.05, 1.0))
def test_auc_lies_between_the_curves_extremes(ys: list[float], budget_frac: float) -> None:
    curve = [(800.0 * i, y) for i, y in enumerate(ys)]
    budget = curve[-1][0] * budget_frac
    auc = normalised_auc(curve, budget)
    assert min(ys) - 1e-9 <= auc <= max(ys) + 1e-9
    lifted = normalised_auc([(x, y + 0.1) for x, y in curve], budget)
    assert lifted == pytest.approx(auc + 0.1)  # a constant shift of the curve shifts its mean by the same


@settings(max_examples=40, deadline=None)
@given(ys=st.lists(accuracies, min_size=1, max_size=10), target=accuracies)
def test_a_crossing_is_a_point_at_or_above_target(ys: list[float], target: float) -> None:
    curve = [(800.0 * (i + 1), y) for i, y in enumerate(ys)]
    x = rollouts_to_target(curve, target)
    smoothed = dict(smooth(curve, 3))
    if x == math.inf:
        assert all(v < target - 1e-12 for v in smoothed.values())
    else:
        assert smoothed[x] >= target - 1e-12 and all(v < target - 1e-12 for p, v in smoothed.items() if p < x)


# --- independent references --------------------------------------------------------------------------------------

def _exact_bootstrap_quantile(values: list[float], q: float) -> float:
    """The q-quantile of the exact bootstrap distribution of the mean: every one of the n^n resamples, equally
    likely, enumerated by brute force (the inverse of the empirical CDF: the smallest mean m with P(<= m) >= q)."""
    means = sorted(sum(r) / len(r) for r in itertools.product(values, repeat=len(values)))
    return means[max(0, math.ceil(q * len(means)) - 1)]


@pytest.mark.parametrize("values", [[0.35, 0.425, 0.425, 0.375, 0.375], [0.375, 0.3, 0.15, 0.2, 0.3],
                                    [0.1, 0.9, 0.2, 0.25]])
def test_monte_carlo_interval_matches_the_exact_bootstrap(values: list[float]) -> None:
    ci = bootstrap(values, resamples=40_000, rng_seed=3)
    exact = (_exact_bootstrap_quantile(values, 0.025), _exact_bootstrap_quantile(values, 0.975))
    # Monte Carlo error of a 2.5% quantile with 40,000 resamples is well under a hundredth of these ranges; the
    # distribution's atoms are 1/n^2 of a value gap apart, so compare to 0.01.
    assert (ci.low, ci.high) == pytest.approx(exact, abs=0.01)


def test_difference_matches_the_exact_bootstrap_of_two_rows() -> None:
    a, b = [0.35, 0.425, 0.425, 0.375], [0.375, 0.3, 0.15, 0.2]
    ma = [sum(r) / 4 for r in itertools.product(a, repeat=4)]
    mb = [sum(r) / 4 for r in itertools.product(b, repeat=4)]
    diffs = np.sort(np.subtract.outer(np.asarray(ma), np.asarray(mb)).ravel())  # all 256 x 256 pairs
    exact = (diffs[math.ceil(0.025 * diffs.size) - 1], diffs[math.ceil(0.975 * diffs.size) - 1])
    d = bootstrap_difference(a, b, resamples=40_000, rng_seed=5)
    assert d.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert (d.low, d.high) == pytest.approx(exact, abs=0.01)


@settings(max_examples=30, deadline=None)
@given(ys=st.lists(accuracies, min_size=2, max_size=8), budget_frac=st.floats(0.1, 1.0), start_frac=st.floats(0, 0.9))
def test_auc_matches_numpy_trapezoid_on_a_fine_grid(ys: list[float], budget_frac: float, start_frac: float) -> None:
    curve = [(800.0 * i, y) for i, y in enumerate(ys)]
    budget = curve[-1][0] * budget_frac
    start = budget * start_frac
    grid = np.linspace(start, budget, 20_001)
    reference = np.trapezoid(np.interp(grid, [x for x, _ in curve], ys), grid) / (budget - start)
    assert normalised_auc(curve, budget, start=start) == pytest.approx(float(reference), abs=1e-4)


def test_smoothing_matches_numpy_convolution_inside() -> None:
    ys = [0.1, 0.4, 0.2, 0.5, 0.3, 0.6]
    inner = np.convolve(ys, np.ones(3) / 3, mode="valid")  # the points with a full window: 3rd onwards, trailing
    assert [v for _, v in smooth(list(enumerate(ys)), 3)][2:] == pytest.approx(inner.tolist())
