"""Run one cell of the matrix as a launched job (`python -m diva_lightning fit`, or torchrun/srun around it) and read
back its result.

Why a separate job and not `run_cli` in the worker: each fit gets fresh interpreters (no torch/Lightning global state,
RNG or memory carried from the previous cell, so a cell's result does not depend on which cells its worker ran
before); a crash, OOM or hang takes down the cell, not the worker, whose heartbeat keeps going; the job can span
several processes or nodes (the launcher); and it is the exact command a user would type, so a cell can be reproduced
from its log. The cost is the interpreter start (a few seconds per cell), small against a fit.

The launcher is a shell command template. Placeholders: `{args}` (the `python -m diva_lightning` arguments of the
cell: `fit --config ...`, required), `{python}` (this interpreter), `{torchrun}` (`{python} -m torch.distributed.run`),
`{run_dir}` (the cell's run folder), `{port}` (a free local port, e.g. for a rendezvous). Other braces are left alone
for the shell. The worker reads the cell's `metrics.csv` from `{run_dir}` (on a shared file system when the job runs
on other machines; Lightning's logger writes it on global rank 0). Presets are in docs/sweeps.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sweeps._common import REPO, Cell, TrialSettings, fit_args
from sweeps.runlog import read_metrics, val_curve

LOCAL_LAUNCHER = "{python} -m diva_lightning {args}"
PLACEHOLDERS = ("args", "python", "torchrun", "run_dir", "port")
LOG_TAIL_CHARS = 4000


def check_launcher(template: str) -> str:
    """The template itself, or ValueError when it cannot run a cell (no `{args}`)."""
    if "{args}" not in template:
        raise ValueError(f"--launcher {template!r} has no {{args}}: it must run `-m diva_lightning {{args}}` "
                         f"(placeholders: {', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    return template


def launch_command(template: str, *, args: list[str], run_dir: Path) -> str:
    """The shell command of one cell: `template` with its placeholders filled in (shell-quoted)."""
    python = shlex.quote(sys.executable)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fields = {"args": shlex.join(args), "python": python, "torchrun": f"{python} -m torch.distributed.run",
              "run_dir": shlex.quote(str(run_dir)), "port": str(port)}
    for name in PLACEHOLDERS:
        template = template.replace("{" + name + "}", fields[name])
    return template


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

    def user_attrs(self) -> dict[str, object]:
        out: dict[str, object] = {"run_dir": self.run_dir, "metrics_path": self.metrics_path,
                                  "log_path": self.log_path, "wall_s": round(self.wall_s, 3), "steps": self.steps}
        if self.ok:
            return out | {"final_accuracy": self.final_accuracy, "best_accuracy": self.best_accuracy}
        return out | {"error": self.error}


KEPT_NAME = "cell_result.json"


def keep_result(result: CellResult, study: str, trial_number: int) -> None:
    """Write a finished cell's result beside its run (`cell_result.json`) before it is written to the study, so that
    a database fault after the fit cannot throw the fit away: the cell's retry finds it (`kept_result`)."""
    if result.ok and result.run_dir and Path(result.run_dir).is_dir():
        record = {"study": study, "trial": trial_number, "result": dataclasses.asdict(result)}
        (Path(result.run_dir) / KEPT_NAME).write_text(json.dumps(record, indent=1))


def kept_result(out_dir: Path, cell: Cell, study: str, lost: set[int]) -> tuple[int, CellResult] | None:
    """A finished result of an earlier attempt at `cell` in study `study` whose trial is one of `lost` (failed or
    stale, so its result never reached the study), as (trial, result); None when there is none."""
    for path in sorted((out_dir / "runs" / cell.row).glob(f"seed{cell.seed}-t*/{KEPT_NAME}")):
        try:
            record = json.loads(path.read_text())
            result = CellResult(**record["result"])
        except (OSError, ValueError, TypeError, KeyError):
            continue
        if record.get("study") == study and record.get("trial") in lost and result.ok:
            return int(record["trial"]), result
    return None


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the worker dies, so a killed worker leaves no orphan fit running. (A launcher
    that starts several processes ends its own: torchrun's agent or srun; `bash -c` execs a single command.)"""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:  # not Linux: the orphan finishes on its own; its result is ignored (the trial went stale)
        pass


def run_cell(cell: Cell, settings: TrialSettings, out_dir: Path, trial_number: int, *,
             launcher: str = LOCAL_LAUNCHER, threads: int | None = None) -> CellResult:
    """Run `cell` into out_dir/runs/<row>/seed<s>-t<n>/ with the job's stdout+stderr in out_dir/logs/; wait for it
    and read its metrics. Never raises for a failed job (the result says why)."""
    version = f"seed{cell.seed}-t{trial_number}"  # one folder per attempt: a retry never mixes with a failure
    run_dir = out_dir / "runs" / cell.row / version
    log_path = out_dir / "logs" / f"{cell.row}-{version}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = launch_command(launcher, args=fit_args(cell, settings, save_dir=out_dir / "runs", version=version),
                         run_dir=run_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {cmd}\n")
        log.flush()
        # Own process group: whatever the launcher leaves behind (a second local torchrun agent) is ended with it.
        job = subprocess.Popen(["bash", "-c", cmd], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True,
                               preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        try:
            code = job.wait()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
    result = CellResult(ok=False, wall_s=time.perf_counter() - start, run_dir=str(run_dir), log_path=str(log_path),
                        metrics_path=str(run_dir / "metrics.csv"))
    if code != 0:
        result.error = f"job exited with code {code}; log tail:\n{_tail(log_path)}"
        return result
    try:
        curve = val_curve(read_metrics(run_dir / "metrics.csv"))
    except (OSError, KeyError, ValueError) as err:
        result.error = f"job succeeded but its metrics could not be read ({err}); log tail:\n{_tail(log_path)}"
        return result
    if not curve:
        result.error = f"no val/accuracy was logged (val_every={settings.val_every}); log tail:\n{_tail(log_path)}"
        return result
    result.ok, result.steps = True, curve[-1][0]
    result.final_accuracy, result.best_accuracy = curve[-1][1], max(v for _, v in curve)
    return result


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
