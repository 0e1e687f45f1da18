"""The paper's Table 2 ablation matrix as an Optuna study: rows x seeds, one Lightning `fit` per cell.

    python sweeps/ablate.py                                   # 6 rows x 3 seeds on the embedded default
    python sweeps/ablate.py --workers 2 --steps 40            # two local workers on the same storage
    python sweeps/ablate.py --storage postgresql://host/db --config my_qwen7b.yaml   # many machines, real model

Every invocation joins the study named by --study in --storage (created on first use), runs cells until none is
left, waits for cells other workers are running, then writes the report into --out. A second invocation on a
finished study trains nothing and only rewrites the report. The claim protocol (no cell lost, none run twice)
is in `sweeps/claim.py`; docs/sweeps.md has the how-to.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna  # noqa: E402
from optuna.exceptions import UpdateFinishedTrialError  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from sweeps._common import REPO, ROWS, TABLE2_ROWS, Cell, TrialSettings, build_grid  # noqa: E402
from sweeps.claim import cell_states, claim_next, fail_stale, heartbeat, open_storage, requeue, setup_study  # noqa: E402
from sweeps.report import runs_from_study, write_report  # noqa: E402
from sweeps.tables import mean_std  # noqa: E402
from sweeps.trial import CellResult, run_cell  # noqa: E402


@dataclass
class SweepOptions:
    """Everything one sweep invocation needs (the command-line flags, importable for tests and notebooks)."""

    out: Path = Path("outputs/ablate")
    storage: str | None = None  # default: sqlite:///<out>/study.db
    study: str = "diva-ablate"
    rows: list[str] = field(default_factory=lambda: list(TABLE2_ROWS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    settings: TrialSettings = field(default_factory=TrialSettings)
    workers: int = 1
    threads: int | None = None
    max_retries: int = 2
    heartbeat_interval: int = 30
    grace_period: int = 120
    poll_s: float = 5.0
    report: bool = True

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    @property
    def cells(self) -> list[Cell]:
        return build_grid(self.rows, self.seeds)


def load(opts: SweepOptions) -> optuna.Study:
    opts.out.mkdir(parents=True, exist_ok=True)
    storage = open_storage(opts.storage_url, heartbeat_interval=opts.heartbeat_interval,
                           grace_period=opts.grace_period, max_retries=opts.max_retries)
    return setup_study(storage, opts.study, opts.cells)


def progress(study: optuna.Study, cells: list[Cell]) -> str:
    """'[ablate] 7/18 done, running: grpo/seed1, best full 0.430' (best = highest row mean of final accuracy)."""
    states = cell_states(study, cells)
    done = [c for c, s in states.items() if s["complete"] is not None]
    running = [c.name for c, s in states.items() if s["running"]]
    finals: dict[str, list[float]] = {}
    for c in done:
        finals.setdefault(c.row, []).append(float(states[c]["complete"].value))
    best = max(((mean_std(v)[0], r) for r, v in finals.items()), default=None)
    failed = [c.name for c, s in states.items() if s["complete"] is None and not s["running"] and not s["waiting"]
              and s["fails"]]
    text = f"[ablate] {len(done)}/{len(cells)} done, running: {', '.join(running) or '-'}"
    text += f", best {best[1]} {best[0]:.3f}" if best else ""
    return text + (f", given up: {', '.join(failed)}" if failed else "")


Runner = Callable[[Cell, TrialSettings, Path, int], CellResult]


def work(opts: SweepOptions, study: optuna.Study | None = None, runner: Runner | None = None) -> int:
    """Run cells until none is claimable and none is running elsewhere; returns the number of cells run here.

    `runner` runs one cell (default: `run_cell`, a `fit` subprocess); tests pass a plain function."""
    runner = runner or (lambda c, s, o, n: run_cell(c, s, o, n, threads=opts.threads))
    study = study or load(opts)
    cells, ran = opts.cells, 0
    while True:
        fail_stale(study)
        trial = claim_next(study, cells)
        if trial is None:
            states = cell_states(study, cells)
            if not any(s["running"] or s["waiting"] for s in states.values()):
                return ran
            time.sleep(opts.poll_s)  # others are running cells; if one dies its trial goes stale and comes back
            continue
        cell = Cell.from_params(trial.params)
        print(f"[ablate] start {cell.name} (trial {trial.number}, pid {os.getpid()})", flush=True)
        with heartbeat(study, trial, opts.heartbeat_interval):
            result = runner(cell, opts.settings, opts.out, trial.number)
        ran += 1
        try:
            for key, value in result.user_attrs().items():
                trial.set_user_attr(key, value)
        except UpdateFinishedTrialError:  # declared stale while we ran (e.g. a suspended machine): a retry owns it
            print(f"[ablate] {cell.name}: trial {trial.number} was failed as stale meanwhile; result discarded",
                  flush=True)
            continue
        if result.ok:
            study.tell(trial, result.final_accuracy)
            print(f"[ablate] done {cell.name}: final {result.final_accuracy:.3f}, best {result.best_accuracy:.3f},"
                  f" {result.wall_s:.0f}s", flush=True)
        else:
            frozen = study.tell(trial, state=TrialState.FAIL)
            again = requeue(study, frozen, opts.max_retries)
            print(f"[ablate] FAILED {cell.name} (trial {trial.number}; {'retrying' if again else 'giving up'}); "
                  f"log {result.log_path}\n{result.error[-1500:]}", flush=True)
        print(progress(study, cells), flush=True)


def run_sweep(opts: SweepOptions, argv: list[str] | None = None) -> Path | None:
    """Start `opts.workers` workers on the study (this process is one of them), wait, then write the report."""
    study = load(opts)
    print(progress(study, opts.cells), flush=True)
    extra: list[subprocess.Popen[bytes]] = []
    if opts.workers > 1:
        cmd = [sys.executable, str(Path(__file__).resolve()), *(argv or []), "--workers", "1", "--no-report"]
        extra = [subprocess.Popen(cmd, cwd=REPO) for _ in range(opts.workers - 1)]
    work(opts, study)
    for p in extra:
        p.wait()
    states = cell_states(study, opts.cells)
    missing = [c.name for c, s in states.items() if s["complete"] is None]
    if missing:
        print(f"[ablate] incomplete: {len(missing)} cells without a result ({', '.join(missing)}); see the FAILED "
              f"lines above and the logs in {opts.out / 'logs'}", flush=True)
    if not opts.report:
        return None
    path = write_report(runs_from_study(study), opts.out)
    print(f"[ablate] report: {path}", flush=True)
    return path


def parse_args(argv: list[str] | None = None) -> SweepOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/ablate", help="sweep folder: runs/, logs/, tables, plots")
    p.add_argument("--storage", default=None, help="Optuna RDB URL or journal:<file> (default sqlite in --out)")
    p.add_argument("--study", default="diva-ablate", help="study name (one study = one matrix)")
    p.add_argument("--rows", nargs="+", default=list(TABLE2_ROWS), choices=list(ROWS),
                   help="rows of the matrix (default: the Table 2 rows; grpo_n5 is an extra baseline)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (one cell per row and seed)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per cell")
    p.add_argument("--val-every", type=int, default=20, help="validate every N steps (must divide --steps)")
    p.add_argument("--config", action="append", default=[], help="extra overlay stacked on every row (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="ARG",
                   help="extra CLI argument for every fit, e.g. --set=--model.init_args.lr=1e-5 (repeatable)")
    p.add_argument("--workers", type=int, default=1, help="worker processes started by this invocation")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each fit (default: inherit)")
    p.add_argument("--max-retries", type=int, default=2, help="re-runs of a failed or stale cell")
    p.add_argument("--heartbeat-interval", type=int, default=30, help="seconds between a running cell's heartbeats")
    p.add_argument("--grace-period", type=int, default=120, help="seconds without heartbeat before a cell is stale")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between checks while others run cells")
    p.add_argument("--no-report", action="store_true", help="do not write the report (extra workers)")
    a = p.parse_args(argv)
    out = Path(a.out)
    return SweepOptions(
        out=out, storage=a.storage, study=a.study, rows=a.rows, seeds=a.seeds,
        settings=TrialSettings(steps=a.steps, val_every=a.val_every, configs=tuple(a.config), overrides=tuple(a.set)),
        workers=a.workers, threads=a.threads, max_retries=a.max_retries, heartbeat_interval=a.heartbeat_interval,
        grace_period=a.grace_period, poll_s=a.poll, report=not a.no_report,
    )


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    if not opts.settings.configs and not any("policy" in a for a in opts.settings.overrides):
        # The embedded default: build the base policy once here, not in every concurrent fit.
        from diva_lightning.cli import ensure_base_policy

        ensure_base_policy(str(REPO / "artifacts/base_policy"), str(REPO / "experiments/warmup.yaml"))
    run_sweep(opts, argv)


if __name__ == "__main__":
    main()
