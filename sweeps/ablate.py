"""The paper's Table 2 ablation matrix as an Optuna study: rows x seeds, one launched `fit` job per cell.

    python sweeps/ablate.py                                   # 6 rows x 3 seeds on the embedded default
    python sweeps/ablate.py --workers 2 --steps 40            # two local workers on the same journal file
    python sweeps/ablate.py --storage postgresql://host/db --config my_qwen7b.yaml   # many machines, real model
    python sweeps/ablate.py --launcher "srun --nodes 2 --ntasks-per-node 8 {python} -m diva_lightning {args}"

Every invocation joins the study named by --study in --storage (created and queued on first use), runs queued cells
until none is left, waits for cells other workers are running, then writes the report into --out. A second
invocation on a finished study trains nothing and only rewrites the report. How cells are queued, handed out and
retried is in `sweeps/study.py`; how a cell is launched in `sweeps/trial.py`; docs/sweeps.md has the how-to.
"""

from __future__ import annotations

import argparse
import os
import socket
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
from optuna.storages import BaseStorage  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from sweeps._common import REPO, ROWS, TABLE2_ROWS, Cell, TrialSettings, build_grid  # noqa: E402
from sweeps.missing import add_to_report, missing_cells  # noqa: E402
from sweeps.report import runs_from_study, write_report  # noqa: E402
from sweeps.study import (  # noqa: E402
    Liveness,
    StorageUnavailable,
    SweepRefused,
    cell_of,
    cell_states,
    duplicate_of,
    fail_stale,
    heartbeat,
    last_heartbeat,
    open_storage,
    open_study,
)
from sweeps.tables import mean_std  # noqa: E402
from sweeps.trial import LOCAL_LAUNCHER, CellResult, check_launcher, keep_result, kept_result, run_cell  # noqa: E402


@dataclass
class SweepOptions:
    """Everything one sweep invocation needs (the command-line flags, importable for tests and notebooks)."""

    out: Path = Path("outputs/ablate")
    storage: str | None = None  # default: journal:<out>/study.journal
    study: str = "diva-ablate"
    rows: list[str] = field(default_factory=lambda: list(TABLE2_ROWS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    settings: TrialSettings = field(default_factory=TrialSettings)
    launcher: str = LOCAL_LAUNCHER
    workers: int = 1
    threads: int | None = None
    live: Liveness = field(default_factory=Liveness)
    poll_s: float = 5.0
    report: bool = True
    retry_given_up: bool = False  # queue given-up cells again, each with 1 + max_retries fresh tries

    def __post_init__(self) -> None:
        check_launcher(self.launcher)

    @property
    def storage_url(self) -> str:
        return self.storage or f"journal:{(self.out / 'study.journal').resolve()}"

    @property
    def cells(self) -> list[Cell]:
        return build_grid(self.rows, self.seeds)


def load(opts: SweepOptions) -> tuple[optuna.Study, BaseStorage]:
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.storage is None and (opts.out / "study.db").exists():
        db = (opts.out / "study.db").resolve()
        raise SweepRefused(f"{db} is a sweep of the earlier layout (SQLite, own claim protocol); this version keeps "
                           f"the study in {opts.out / 'study.journal'} and does not resume it. Report it with "
                           f"python sweeps/report.py --storage sqlite:///{db} --out {opts.out}, or move it away.")
    storage = open_storage(opts.storage_url, opts.live)
    return open_study(storage, opts.study, opts.cells), storage


def progress(study: optuna.Study) -> str:
    """'[ablate] 7/18 done, running: grpo/seed1, best full 0.430' (best = highest row mean of final accuracy)."""
    states = cell_states(study)
    finals: dict[str, list[float]] = {}
    for c, s in states.items():
        if s.complete is not None:
            finals.setdefault(c.row, []).append(float(s.complete.value))  # type: ignore[arg-type]
    best = max(((mean_std(v)[0], r) for r, v in finals.items()), default=None)
    text = (f"[ablate] {sum(map(len, finals.values()))}/{len(states)} done, running: "
            f"{', '.join(c.name for c, s in states.items() if s.running) or '-'}")
    text += f", best {best[1]} {best[0]:.3f}" if best else ""
    given_up = [c.name for c, s in states.items() if s.given_up]
    return text + (f", given up: {', '.join(given_up)}" if given_up else "")


def waiting_for(study: optuna.Study, live: Liveness) -> tuple[str, tuple[tuple[int, bool], ...]]:
    """What a worker with nothing queued waits for (cells running elsewhere, how long a silent one has left), and a
    key that changes only when that changes: (trial, looks stale) of each running cell."""
    now, parts, key = time.time(), [], []
    for cell, s in cell_states(study).items():
        for t in s.running:
            silent = now - last_heartbeat(t)
            stale = silent > 2 * live.heartbeat_interval
            key.append((t.number, stale))
            parts.append(f"{max(0.0, live.grace_period - silent):.0f} s for a stale cell's heartbeat ({cell.name}, "
                         f"trial {t.number}, silent {silent:.0f} s; it is retried after {live.grace_period} s)"
                         if stale else f"for {cell.name} (trial {t.number}, running elsewhere)")
    return "[ablate] waiting " + "; ".join(parts), tuple(key)


class CellFailed(Exception):
    """The job of a cell failed (its log tail is in the trial's `error` user attr)."""


Runner = Callable[[Cell, TrialSettings, Path, int], CellResult]


@dataclass
class Worker:
    """Runs queued cells of one study through `study.optimize` (which pops them and, on RDB, keeps their heartbeat)."""

    opts: SweepOptions
    study: optuna.Study
    runner: Runner
    ran: int = 0  # cells whose job this worker ran
    current: int | None = None  # the trial this worker is running
    discarded: bool = False  # its trial was failed as stale while it ran

    def objective(self, trial: optuna.Trial) -> float:
        self.current, self.discarded, cell = trial.number, False, cell_of(trial)
        if cell is None:  # two workers asked for the last queued cell; Optuna made this one a fresh trial
            raise optuna.TrialPruned("no queued cell was left")
        dup = duplicate_of(self.study, trial.number, cell)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup)
            raise optuna.TrialPruned(f"{cell.name} is trial {dup}")
        print(f"[ablate] start {cell.name} (trial {trial.number}, pid {os.getpid()})", flush=True)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        trial.set_user_attr("error", None)  # a retry inherits its predecessor's user attrs
        lost = {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if cell_of(t) == cell}
        kept = kept_result(self.opts.out, cell, self.opts.study, lost)
        if kept is not None:  # an earlier try finished its fit but could not write the result to the study
            print(f"[ablate] {cell.name}: keeping the finished result of trial {kept[0]} ({kept[1].run_dir}), whose "
                  "write to the study was lost; not fitting again", flush=True)
            result = kept[1]
            trial.set_user_attr("kept_from_trial", kept[0])
        else:
            with heartbeat(trial, self.opts.live.heartbeat_interval):
                result = self.runner(cell, self.opts.settings, self.opts.out, trial.number)
            self.ran += 1
            keep_result(result, self.opts.study, trial.number)
        try:
            for key, value in result.user_attrs().items():
                trial.set_user_attr(key, value)
        except UpdateFinishedTrialError:
            self.discarded = True
            raise
        if not result.ok:
            raise CellFailed(f"{cell.name}: log {result.log_path}")
        print(f"[ablate] done {cell.name}: final {result.final_accuracy:.3f}, best {result.best_accuracy:.3f}, "
              f"{result.wall_s:.0f}s", flush=True)
        return result.final_accuracy

    def after(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """optimize callback: a failed job's cell is re-queued (at most --max-retries times)."""
        cell = cell_of(trial)
        if trial.state != TrialState.FAIL or cell is None:
            return
        self.opts.live.retry()(study, trial)
        again = cell_states(study)[cell].waiting
        print(f"[ablate] FAILED {cell.name} (trial {trial.number}; {'retrying' if again else 'giving up'}); "
              f"log {trial.user_attrs.get('log_path')}\n{str(trial.user_attrs.get('error'))[-1500:]}", flush=True)

    def run_one(self) -> None:
        self.current, self.discarded = None, False
        try:
            self.study.optimize(self.objective, n_trials=1, catch=(CellFailed,), callbacks=[self.after])
        except BaseException as err:
            lost = _storage_unavailable(err)
            if lost is not None:  # nothing more can be read or written; a finished fit is kept on disk (kept_result)
                raise lost from None
            if self.discarded and isinstance(err, (UpdateFinishedTrialError, ValueError)):
                print(f"[ablate] trial {self.current} was failed as stale while it ran (e.g. a suspended machine); "
                      "its result is discarded, a retry owns the cell", flush=True)
                return
            # Ctrl-C or a crash of the worker itself: optimize told FAIL; the cell goes back in the queue.
            trial = None if self.current is None else self.study.get_trials()[self.current]
            if trial is not None and trial.state == TrialState.FAIL:
                self.opts.live.retry()(self.study, trial)
            raise


def _storage_unavailable(err: BaseException) -> StorageUnavailable | None:
    """The StorageUnavailable behind `err`, if any (Optuna's optimize may raise another error while handling it)."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        if isinstance(e, StorageUnavailable):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def work(opts: SweepOptions, runner: Runner | None = None) -> int:
    """Run queued cells until none is queued and none is running elsewhere; returns the number run here.

    `runner` runs one cell (default: `run_cell` with the launcher); tests may pass a plain function."""
    study, storage = load(opts)
    worker = Worker(opts, study, runner or (
        lambda c, s, o, n: run_cell(c, s, o, n, launcher=opts.launcher, threads=opts.threads)))
    said, said_at = (), 0.0
    while True:
        fail_stale(study, storage, opts.live)
        states = cell_states(study)
        if any(s.waiting for s in states.values()):
            worker.run_one()
            print(progress(study), flush=True)
            continue
        if not any(s.running for s in states.values()):
            return worker.ran
        text, key = waiting_for(study, opts.live)
        if key != said or time.monotonic() - said_at > 30:
            print(text, flush=True)  # when what it waits for changes, and every 30 s
            said, said_at = key, time.monotonic()
        time.sleep(opts.poll_s)


def requeue_given_up(study: optuna.Study, retry: bool) -> list[Cell]:
    """Cells that used up their retries: queued again when `retry` (--retry-given-up; the new trial gets 1 +
    --max-retries tries, as a fresh cell: the retry callback counts from it), else named with the flag
    that would. Returns them."""
    given_up = [c for c, s in cell_states(study).items() if s.given_up]
    if given_up and retry:
        for cell in given_up:
            study.enqueue_trial(cell.params, user_attrs=cell.params)
        print(f"[ablate] --retry-given-up: queued {', '.join(c.name for c in given_up)} again", flush=True)
    elif given_up:
        print(f"[ablate] given up earlier, not retried: {', '.join(c.name for c in given_up)} (pass --retry-given-up "
              "to try them again)", flush=True)
    return given_up


def run_sweep(opts: SweepOptions, argv: list[str] | None = None, runner: Runner | None = None) -> Path | None:
    """Start `opts.workers` workers on the study (this process is one of them), wait, then write the report.
    `runner` runs this process's cells (default: the launcher; tests may pass a plain function)."""
    study, _ = load(opts)
    requeue_given_up(study, opts.retry_given_up)
    print(progress(study), flush=True)
    extra: list[subprocess.Popen[bytes]] = []
    if opts.workers > 1:
        own = [a for a in argv or [] if a != "--retry-given-up"]  # this process queued them already
        cmd = [sys.executable, str(Path(__file__).resolve()), *own, "--workers", "1", "--no-report"]
        extra = [subprocess.Popen(cmd, cwd=REPO) for _ in range(opts.workers - 1)]
    work(opts, runner)
    for p in extra:
        p.wait()
    missing = missing_cells(study)
    for cell, why in missing:
        print(f"[ablate] no result: {cell.name}: {why}", flush=True)
    if missing:
        print(f"[ablate] incomplete: {len(missing)} of {len(cell_states(study))} cells without a result; job logs in "
              f"{opts.out / 'logs'}", flush=True)
    if not opts.report:
        return None
    path = write_report(runs_from_study(study), opts.out)
    add_to_report(path, study)
    print(f"[ablate] report: {path}", flush=True)
    return path


def parse_args(argv: list[str] | None = None) -> SweepOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/ablate", help="sweep folder: runs/, logs/, tables, plots")
    p.add_argument("--storage", default=None,
                   help="journal:<file> (default journal:<out>/study.journal) or an RDB URL (postgresql://...)")
    p.add_argument("--study", default="diva-ablate", help="study name (one study = one matrix)")
    p.add_argument("--rows", nargs="+", default=list(TABLE2_ROWS), choices=list(ROWS),
                   help="rows of the matrix (default: the Table 2 rows; grpo_n5 is an extra baseline)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (one cell per row and seed)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per cell")
    p.add_argument("--val-every", type=int, default=20, help="validate every N steps (must divide --steps)")
    p.add_argument("--config", action="append", default=[], help="extra overlay stacked on every row (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="ARG",
                   help="extra CLI argument for every fit, e.g. --set=--model.init_args.lr=1e-5 (repeatable)")
    p.add_argument("--launcher", default=LOCAL_LAUNCHER,
                   help="shell command template of a cell's job; {args} = the fit arguments, also {python}, "
                        "{torchrun}, {run_dir}, {port} (presets in docs/sweeps.md)")
    p.add_argument("--workers", type=int, default=1, help="worker processes started by this invocation")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of each job (default: inherit)")
    p.add_argument("--max-retries", type=int, default=2, help="re-runs of a failed or stale cell")
    p.add_argument("--heartbeat-interval", type=int, default=30, help="seconds between a running cell's heartbeats")
    p.add_argument("--grace-period", type=int, default=120, help="seconds without heartbeat before a cell is stale")
    p.add_argument("--storage-patience", type=float, default=300.0,
                   help="seconds every database call retries a lost connection (a server restart) before the "
                        "worker stops with one line")
    p.add_argument("--retry-given-up", action="store_true",
                   help="queue cells that used up their tries again; each gets 1 + --max-retries fresh tries, as a new "
                        "cell does (the report names given-up cells)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between checks while others run cells")
    p.add_argument("--no-report", action="store_true", help="do not write the report (extra workers)")
    a = p.parse_args(argv)
    try:
        return SweepOptions(
            out=Path(a.out), storage=a.storage, study=a.study, rows=a.rows, seeds=a.seeds,
            settings=TrialSettings(steps=a.steps, val_every=a.val_every, configs=tuple(a.config),
                                   overrides=tuple(a.set)),
            launcher=a.launcher, workers=a.workers, threads=a.threads,
            live=Liveness(a.heartbeat_interval, a.grace_period, a.max_retries, a.storage_patience), poll_s=a.poll,
            report=not a.no_report, retry_given_up=a.retry_given_up)
    except ValueError as err:
        p.error(str(err))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the [ablate] lines say what happened to each cell
    try:
        run_sweep(opts, argv)
    except (SweepRefused, StorageUnavailable) as err:  # one clear line, no traceback
        sys.exit(f"[ablate] {err}")


if __name__ == "__main__":
    main()
