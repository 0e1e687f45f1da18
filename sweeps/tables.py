"""The report's math, as pure functions of plain numbers (hand-checked in tests/sweeps/test_tables.py).

Conventions:
- A *curve* is a list of (optimizer steps done, value) pairs sorted by step.
- Mean +- std over seeds uses the sample standard deviation (n - 1); with one seed it does not exist (nan, printed
  "n/a" by `fmt`).
- Deltas are row minus the `full` row (negative = the ablation lost accuracy), as in the paper's Table 2.
- Efficiency target: the best value of the baseline row's seed-mean validation curve. A row "reaches" it at the
  first validated step where its own seed-mean curve is >= the target; its seconds are the seeds' mean
  wall-clock at that step. Ratios are row / baseline (below 1 = faster than GRPO).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Curve = list[tuple[int, float]]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof 1; nan for a single value: one seed has no spread to estimate). Empty: (nan, nan)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


@dataclass(frozen=True)
class RowSummary:
    """One line of Table 2: final and best val/accuracy over seeds and their deltas to the full method."""

    row: str
    seeds: int
    final_mean: float
    final_std: float
    best_mean: float
    best_std: float
    delta_final: float
    delta_best: float


def table2(per_row: dict[str, list[tuple[float, float]]], full: str = "full") -> list[RowSummary]:
    """per_row: row -> [(final, best) per seed], in display order. Deltas are nan when `full` is absent."""
    stats = {row: (mean_std([f for f, _ in runs]), mean_std([b for _, b in runs])) for row, runs in per_row.items()}
    ref = stats.get(full)
    out = []
    for row, ((fm, fs), (bm, bs)) in stats.items():
        d_final = fm - ref[0][0] if ref else math.nan
        d_best = bm - ref[1][0] if ref else math.nan
        out.append(RowSummary(row, len(per_row[row]), fm, fs, bm, bs, d_final, d_best))
    return out


def mean_curve(curves: Sequence[Curve]) -> list[tuple[int, float, float]]:
    """(step, mean, std) over seeds at the steps every seed has (seeds with different cadences are cut)."""
    if not curves:
        return []
    common = set.intersection(*({s for s, _ in c} for c in curves))
    maps = [dict(c) for c in curves]
    return [(s, *mean_std([m[s] for m in maps])) for s in sorted(common)]


def first_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """First step whose value is >= target (1e-12 slack for float noise); None if never."""
    for step, value in curve:
        if value >= target - 1e-12:
            return step
    return None


@dataclass(frozen=True)
class EfficiencyRow:
    """Steps and seconds a row needs to reach the baseline's best accuracy, and their ratio to the baseline."""

    row: str
    steps: int | None
    seconds: float
    step_ratio: float
    time_ratio: float


def efficiency(
    curves: dict[str, list[Curve]], times: dict[str, list[Curve]], baseline: str = "grpo"
) -> tuple[float, list[EfficiencyRow]]:
    """curves: row -> per-seed val curves; times: row -> per-seed (step, elapsed seconds) at validation.

    Returns (target, rows). A row that never reaches the target has steps None and nan seconds/ratios; so do all
    rows when the baseline is missing."""
    base = mean_curve(curves.get(baseline, []))
    if not base:
        return math.nan, [EfficiencyRow(r, None, math.nan, math.nan, math.nan) for r in curves]
    target = max(m for _, m, _ in base)
    reached: dict[str, tuple[int | None, float]] = {}
    for row, row_curves in curves.items():
        step = first_reach([(s, m) for s, m, _ in mean_curve(row_curves)], target)
        seconds = math.nan
        if step is not None:
            at = [dict(t).get(step, math.nan) for t in times.get(row, [])]
            seconds = mean_std(at)[0] if at else math.nan
        reached[row] = (step, seconds)
    b_steps, b_secs = reached[baseline]
    rows = []
    for row, (step, secs) in reached.items():
        s_ratio = step / b_steps if step is not None and b_steps else math.nan
        t_ratio = secs / b_secs if b_secs and not math.isnan(b_secs) else math.nan
        rows.append(EfficiencyRow(row, step, secs, s_ratio, t_ratio))
    return target, rows


def fmt(mean: float, std: float | None = None, digits: int = 3) -> str:
    """'0.431 ± 0.012', '0.431 ± n/a' (std asked for but nan: one seed), '0.431' (no std), or 'n/a' (nan mean)."""
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.{digits}f}"
    if std is None:
        return text
    return f"{text} ± n/a" if math.isnan(std) else f"{text} ± {std:.{digits}f}"


def signed(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.{digits}f}"
