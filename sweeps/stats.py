"""The report's statistics protocol over seeds, as pure functions of plain numbers (issue 27).

A sweep's claims are about a method, not about the seeds it happened to run, so every headline number comes with
its per-seed values, a bootstrap confidence interval over seeds, and the spread (worst seed, share of seeds that
collapse) beside the mean. Conventions (tests: tests/sweeps/test_stats.py):

- **Interval**: percentile bootstrap over seeds. The seeds' values are resampled with replacement ``resamples``
  times (default 10,000) by ``numpy.random.default_rng(rng_seed)`` (default 0, so a report is reproducible), the
  statistic (the mean) is computed on each resample, and the interval is the (1 - level) / 2 and (1 + level) / 2
  quantiles of those statistics (inverted empirical CDF: the smallest resampled value whose share reaches q);
  level 0.95 by default. The values are sorted first, so the interval depends on the multiset of values, not on
  the seeds' order. With one seed there is no interval (nan, printed "n/a"). With few seeds the percentile
  bootstrap is too narrow: it cannot see variation the seeds did not show (for normal data its half-width is
  about 1.96 s sqrt((n - 1) / n) / sqrt(n) where Student's t needs t(n - 1) s / sqrt(n); simulated with that
  half-width, a nominal 95% interval of the mean covers 85% with 5 seeds and 89% with 8). Read an interval on 5
  seeds as a lower bound on the uncertainty, not as a test.
- **Difference of two rows**: each row's seeds are resampled independently (different seeds are independent
  runs), and the interval is that of the difference of the resampled means.
- **Efficiency per seed**, two measures, both on x = rollouts generated (a dynamic-sampling row's dropped draws
  count):
  * *rollouts to target*: the first x at which the seed's *smoothed* curve (trailing moving average over ``window``
    validations: each point and the ones before it, never a later one; the window shrinking at the start) reaches
    a fixed target, fixed before the run (not taken from
    another row's noisy best). A seed that never reaches it is censored: it counts as +inf, so the row statistic
    is the median (defined while more than half the seeds reach it) and the share of seeds that reach it is
    reported beside it.
  * *normalised AUC*: the area under the seed's curve (linear between validations) from x = start to x =
    budget, divided by (budget - start): the mean accuracy over the budget. Always defined when the curve covers
    [start, budget]; its row statistic is the mean, with a bootstrap interval.
- **Collapse**: a seed collapses on a metric when its final value is below the target (it never learned the share,
  or lost it by the end); the report shows the share of seeds that collapse and the worst seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Curve = Sequence[tuple[float, float]]  # (x, value) sorted by x
RESAMPLES, RNG_SEED, LEVEL = 10_000, 0, 0.95


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval (nan bounds: the interval does not exist, e.g. one seed)."""

    estimate: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high

    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely above or entirely below 0 (False when it does not exist)."""
        return (self.low > 0 or self.high < 0) and not math.isnan(self.low)


STATISTICS: dict[str, Callable[..., Any]] = {"mean": np.mean, "median": np.median}  # called with axis=1 on [B, n]


def _resampled(values: Sequence[float], statistic: str, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The statistic of ``resamples`` with-replacement resamples of the (sorted) values: shape [resamples]."""
    data = np.sort(np.asarray(values, dtype=float))  # [n]; sorted: the result depends on the multiset only
    index = rng.integers(0, len(data), size=(resamples, len(data)))  # [resamples, n]
    return np.asarray(STATISTICS[statistic](data[index], axis=1), dtype=float)


def _check(values: Sequence[float], resamples: int, level: float) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if any(math.isnan(v) for v in values):
        raise ValueError(f"bootstrap over seeds: a value is nan ({list(values)}); drop the seed or fix its metric")


def _bounds(stats: np.ndarray, level: float) -> tuple[float, float]:
    # inverted CDF: the smallest resampled statistic whose empirical CDF reaches q (no interpolation, so a
    # censored +inf never meets inf - inf)
    low, high = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(low), float(high)


def bootstrap(values: Sequence[float], *, statistic: str = "mean", resamples: int = RESAMPLES,
              level: float = LEVEL, rng_seed: int = RNG_SEED) -> Interval:
    """The statistic ('mean' or 'median') of the seeds' values and its percentile-bootstrap interval.

    +inf values (a censored seed) are allowed with the median. Empty: all nan; one value: the value, nan bounds.
    """
    _check(values, resamples, level)
    if not values:
        return Interval(math.nan, math.nan, math.nan)
    estimate = float(STATISTICS[statistic](np.asarray(values, dtype=float)))
    if len(values) == 1:
        return Interval(estimate, math.nan, math.nan)
    stats = _resampled(values, statistic, resamples, np.random.default_rng(rng_seed))
    return Interval(estimate, *_bounds(stats, level))


def bootstrap_difference(a: Sequence[float], b: Sequence[float], *, resamples: int = RESAMPLES,
                         level: float = LEVEL, rng_seed: int = RNG_SEED) -> Interval:
    """mean(a) - mean(b) and its percentile-bootstrap interval, each row's seeds resampled independently.

    No interval (nan bounds) unless both rows have at least two seeds; all nan when either is empty."""
    _check([*a, *b], resamples, level)
    if not a or not b:
        return Interval(math.nan, math.nan, math.nan)
    estimate = float(np.mean(a) - np.mean(b))
    if len(a) < 2 or len(b) < 2:
        return Interval(estimate, math.nan, math.nan)
    rng = np.random.default_rng(rng_seed)
    diffs = _resampled(a, "mean", resamples, rng) - _resampled(b, "mean", resamples, rng)
    return Interval(estimate, *_bounds(diffs, level))


def smooth(curve: Curve, window: int) -> list[tuple[float, float]]:
    """Trailing (causal) moving average over ``window`` consecutive points (1 = unchanged): the value at x_i is the
    mean of x_i and the ``window - 1`` points before it, never of a later one, so a seed is only credited at x_i with
    what it had shown by x_i. At the start the window shrinks to the points that exist (the first point is itself,
    the second of a window-3 smoothing the mean of the first two)."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    ys = [v for _, v in curve]
    out = []
    for i, (x, _) in enumerate(curve):
        part = ys[max(0, i - window + 1): i + 1]
        out.append((x, sum(part) / len(part)))
    return out


def first_crossing(curve: Curve, target: float) -> float:
    """The first x whose value is >= target (1e-12 slack for float noise); +inf when never (a censored seed)."""
    for x, value in curve:
        if value >= target - 1e-12:
            return x
    return math.inf


def rollouts_to_target(curve: Curve, target: float, window: int = 3) -> float:
    """Rollouts until the seed's trailing-smoothed curve (`smooth`) first reaches ``target`` (+inf: not within the
    run)."""
    return first_crossing(smooth(curve, window), target)


def interpolate(curve: Curve, x: float) -> float:
    """The curve's value at x, linear between points; nan outside [first x, last x]."""
    xs = [p for p, _ in curve]
    if not curve or x < xs[0] - 1e-9 or x > xs[-1] + 1e-9:
        return math.nan
    for (x0, y0), (x1, y1) in zip(curve, curve[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


def normalised_auc(curve: Curve, budget: float, start: float = 0.0) -> float:
    """Area under the curve (linear between points) over [start, budget] divided by (budget - start): the mean
    value over the budget. nan when the curve does not cover the whole window."""
    if not budget > start:
        raise ValueError(f"AUC window: budget ({budget}) must exceed start ({start})")
    lo, hi = interpolate(curve, start), interpolate(curve, budget)
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    inside = [(x, y) for x, y in curve if start < x < budget]
    points = [(start, lo), *inside, (budget, hi)]
    area = sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in zip(points, points[1:]))
    return area / (budget - start)


@dataclass(frozen=True)
class SeedSpread:
    """A row's per-seed values of one number, with the mean's interval and the spread beside it."""

    values: tuple[float, ...]
    mean: Interval
    worst: float
    collapsed: int  # seeds whose value is below the collapse floor (0 when no floor is given)

    @property
    def seeds(self) -> int:
        return len(self.values)


def spread(values: Sequence[float], *, floor: float | None = None, resamples: int = RESAMPLES,
           level: float = LEVEL, rng_seed: int = RNG_SEED) -> SeedSpread:
    """Per-seed values, mean with bootstrap interval, worst (lowest) seed and how many fall below ``floor``."""
    worst = min(values) if values else math.nan
    collapsed = sum(v < floor - 1e-12 for v in values) if floor is not None else 0
    return SeedSpread(tuple(values), bootstrap(values, resamples=resamples, level=level, rng_seed=rng_seed),
                      worst, collapsed)
