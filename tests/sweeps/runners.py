"""A cell runner for sweep tests that runs no fit: it writes the metrics.csv a fit's CSVLogger would, fixed per cell,
so that two sweeps' reports can be compared byte for byte (a fit's timings differ from run to run)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

from sweeps._common import Cell, TrialSettings
from sweeps.trial import CellResult


class CsvRunner:
    """Writes a fixed metrics.csv for each cell (two validations and two training rows) after `fault(cell)`, which
    runs while the cell's heartbeats write; records each call."""

    def __init__(self, fault: Callable[[Cell], None] = lambda cell: None, fail: set[Cell] | None = None) -> None:
        self.calls: list[Cell] = []
        self.fault, self.fail = fault, fail or set()

    def __call__(self, cell: Cell, settings: TrialSettings, out: Path, number: int) -> CellResult:
        self.calls.append(cell)
        self.fault(cell)
        if cell in self.fail:
            return CellResult(ok=False, error="boom\nsecond line", log_path=str(out / "logs" / "x.log"))
        run = out / "runs" / cell.row / f"seed{cell.seed}-t{number}"
        run.mkdir(parents=True, exist_ok=True)
        acc = 0.3 + 0.1 * cell.seed + (0.2 if cell.row == "full" else 0.0)
        with open(run / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", "reward", "frac_reward_zero_std", "val/accuracy", "val/elapsed_s"])
            w.writerow([0, acc / 2, 0.5, "", ""])
            w.writerow([1, acc, 0.25, "", ""])
            w.writerow([0, "", "", acc - 0.1, 10.0 + cell.seed])
            w.writerow([1, "", "", acc, 20.0 + cell.seed])
        return CellResult(ok=True, final_accuracy=acc, best_accuracy=acc, steps=2, wall_s=0.1, run_dir=str(run),
                          metrics_path=str(run / "metrics.csv"))
