"""Reading a run's `metrics.csv` (Lightning CSVLogger) into curves.

The CSV has one row per logging call; training rows and validation rows are separate, empty cells mean "not
logged on this row". Lightning writes the step of a row as the optimizer steps done minus one (a validation
after 2 steps carries step 1), so every curve here is indexed by *steps done* = step + 1. The one exception is the
validation `ValidateAfterTraining` runs once the fit loop has counted the last step (marked `val/after_training`):
Lightning logs it at the steps done themselves (after 3 steps: step 3, while the last training row carries step 2),
so its steps done = step; `steps_done` applies both rules.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

Row = dict[str, float]


def read_metrics(path: str | Path) -> list[Row]:
    """All rows of a metrics.csv with their non-empty cells as floats."""
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]


def steps_done(row: Row) -> int:
    """Optimizer steps done when `row` was logged (module docs): step + 1, or step for the after-training
    validation."""
    step = int(row["step"])
    return step if not math.isnan(row.get("val/after_training", math.nan)) else step + 1


def series(rows: list[Row], key: str) -> list[tuple[int, float]]:
    """(steps done, value) of every row that logged `key`, sorted by step (later rows win on ties)."""
    out = {steps_done(r): r[key] for r in rows if key in r and "step" in r and not math.isnan(r[key])}
    return sorted(out.items())


def val_curve(rows: list[Row]) -> list[tuple[int, float]]:
    """(steps done, val/accuracy) at every validation of training. A validation before the first step (the base
    policy's score, marked `val/before_training` by `ValidateBeforeTraining`) is not part of the curve: Lightning
    logs it at step 0, which would read as "after 1 step" and count towards the best accuracy."""
    return series([r for r in rows if math.isnan(r.get("val/before_training", math.nan))], "val/accuracy")


def val_times(rows: list[Row]) -> list[tuple[int, float]]:
    """(steps done, seconds since fit start) at every validation (logged by `ElapsedTime`)."""
    return series(rows, "val/elapsed_s")


def columns(rows: list[Row], prefix: str) -> list[str]:
    """Column names starting with `prefix`, in first-seen order."""
    seen: dict[str, None] = {}
    for r in rows:
        for k in r:
            if k.startswith(prefix):
                seen.setdefault(k, None)
    return list(seen)
