"""Run one cell of the matrix as a `python -m diva_lightning fit` subprocess and read back its result.

Why a subprocess and not `run_cli` in the worker: each fit gets a fresh interpreter (no torch/Lightning global
state, RNG or memory carried from the previous cell, so a cell's result does not depend on which cells its
worker ran before); a crash, OOM or hang takes down the cell, not the worker, whose heartbeat thread keeps
answering; and the child is the exact command a user would type, so a cell can be reproduced from its log.
The cost is the interpreter start (a few seconds per cell), small against a fit.
"""

from __future__ import annotations

import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sweeps._common import REPO, Cell, TrialSettings, fit_args
from sweeps.runlog import read_metrics, val_curve

LOG_TAIL_CHARS = 4000


@dataclass
class CellResult:
    """What a finished cell reports (the trial's value and user attrs)."""

    ok: bool
    final_accuracy: float = math.nan
    best_accuracy: float = math.nan
    steps: int = 0
    wall_s: float = 0.0
    run_dir: str = ""
    metrics_path: str = ""
    log_path: str = ""
    error: str = ""
    attrs: dict[str, object] = field(default_factory=dict)

    def user_attrs(self) -> dict[str, object]:
        out: dict[str, object] = {"run_dir": self.run_dir, "metrics_path": self.metrics_path,
                                  "log_path": self.log_path, "wall_s": round(self.wall_s, 3), "steps": self.steps}
        if self.ok:
            out |= {"final_accuracy": self.final_accuracy, "best_accuracy": self.best_accuracy}
        else:
            out["error"] = self.error
        return out


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the worker dies, so a killed worker leaves no orphan fit running."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the orphan finishes on its own; its result is ignored (the trial went stale)
        pass


def run_cell(cell: Cell, settings: TrialSettings, out_dir: Path, trial_number: int, *,
             threads: int | None = None) -> CellResult:
    """Fit `cell` into out_dir/runs/<row>/seed<s>-t<n>/ with stdout+stderr in out_dir/logs/; never raises for
    a failed fit (the result says why)."""
    version = f"seed{cell.seed}-t{trial_number}"  # one folder per attempt: a retry never mixes with a failure
    run_dir = out_dir / "runs" / cell.row / version
    log_path = out_dir / "logs" / f"{cell.row}-{version}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "diva_lightning", *fit_args(cell, settings, save_dir=out_dir / "runs",
                                                              version=version)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    wall = time.perf_counter() - start
    result = CellResult(ok=False, wall_s=wall, run_dir=str(run_dir), log_path=str(log_path),
                        metrics_path=str(run_dir / "metrics.csv"))
    if code != 0:
        result.error = f"fit exited with code {code}; log tail:\n{_tail(log_path)}"
        return result
    try:
        curve = val_curve(read_metrics(run_dir / "metrics.csv"))
    except (OSError, KeyError, ValueError) as err:
        result.error = f"fit succeeded but its metrics could not be read ({err}); log tail:\n{_tail(log_path)}"
        return result
    if not curve:
        result.error = f"no val/accuracy was logged (val_every={settings.val_every}); log tail:\n{_tail(log_path)}"
        return result
    result.ok, result.steps = True, curve[-1][0]
    result.final_accuracy, result.best_accuracy = curve[-1][1], max(v for _, v in curve)
    return result


def _tail(path: Path) -> str:
    text = path.read_text(errors="replace")
    return text[-LOG_TAIL_CHARS:]
