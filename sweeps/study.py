"""The study that holds the matrix: its storage, its queue of cells, and what happens to a cell whose worker died.

Optuna does the coordination; this module picks the storage, fills the queue once, and fills one gap in Optuna 5.0.

- **Storage.** `journal:<file>` (the default, `<out>/study.journal`): Optuna's `JournalStorage` on a
  `JournalFileBackend`, whose file lock makes it safe for several processes on one machine (or a shared file system).
  Any SQLAlchemy RDB URL (`postgresql://...`, `mysql+pymysql://...`) for several machines. SQLite is refused: there
  Optuna's hand-out of a queued trial is a read followed by a write, which two processes can both win (Optuna
  advises against SQLite for parallel workers).
- **Queue.** The invocation that creates the study (`optuna.create_study` is atomic: a second creator gets
  `DuplicatedStudyError`) enqueues every cell once (`enqueue_trial`, the cell in params and user attrs) and then sets
  the study attr `queued`. Other invocations wait for that attr, then enqueue only cells the study lacks (a grid
  grown by `--rows/--seeds`, or a creator that died half-way; `skip_if_exists=True`). Workers call `study.optimize`,
  which pops the next queued trial: atomically on journal and RDB storages. A worker never asks the sampler.
- **Dead workers.** A cell runs inside `study.optimize`, so on RDB storages Optuna records its heartbeat, fails it
  after `grace_period` s of silence (`fail_stale_trials`) and re-queues it (`RetryHeartbeatStaleTrialCallback`, at
  most `max_retries` times per cell). Optuna 5.0's `JournalStorage` has no heartbeat (optuna#6615); there a thread in
  the worker writes the user attr `heartbeat_at`, and `fail_stale` takes the same two steps through public calls:
  `study.tell(n, state=FAIL)` (only one worker wins it) and the same retry callback. `heartbeat_at` is written on RDB
  storages too, only so that waiting workers can say how long a silent cell has left.
- **Failed fits** are re-queued by the same callback; after `max_retries` retries the cell is given up.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import sqlalchemy.exc
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from sweeps._common import Cell

QUEUED_ATTR = "queued"  # study attr: number of cells enqueued, set once the queue is complete
OLD_LAYOUT_ATTR = "grid_size"  # study attr of the earlier claim-protocol layout (lock studies per cell)


class SweepRefused(ValueError):
    """A storage or study this version cannot run the matrix on (the message says why and what to do)."""


@dataclass(frozen=True)
class Liveness:
    """How a dead worker's cell comes back: silence after which it is failed, and how often a cell is retried."""

    heartbeat_interval: int = 30
    grace_period: int = 120
    max_retries: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.heartbeat_interval < self.grace_period or self.max_retries < 0:
            raise ValueError(f"need 1 <= heartbeat_interval < grace_period and max_retries >= 0, got "
                             f"{self.heartbeat_interval}, {self.grace_period}, {self.max_retries}")

    def retry(self) -> RetryHeartbeatStaleTrialCallback:
        with warnings.catch_warnings():  # experimental in Optuna 5.0; we rely on it knowingly
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RetryHeartbeatStaleTrialCallback(max_retry=self.max_retries)


def open_storage(url: str, live: Liveness = Liveness()) -> BaseStorage:
    """`journal:<file>` or an RDB URL (see the module docstring); SQLite is refused with the reason."""
    if url.startswith("journal:"):
        path = Path(url[len("journal:"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith("sqlite"):
        raise SweepRefused(f"--storage {url}: SQLite cannot hand out cells to several processes safely (Optuna's pop "
                           "of a queued trial is a read then a write there). Use journal:<file> (the default) or a "
                           "PostgreSQL/MySQL URL. A study of the earlier layout in SQLite can still be reported: "
                           "python sweeps/report.py --storage sqlite:///... --out DIR")
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are experimental in Optuna 5.0
                warnings.simplefilter("ignore", ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=live.heartbeat_interval, grace_period=live.grace_period,
                                  heartbeat_stale_trial_callback=live.retry())
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Workers opening a fresh database together race on creating its tables; the loser's next try finds them.
            if "already exists" not in str(e) and "duplicate key" not in str(e) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(storage: BaseStorage, name: str, cells: list[Cell], *, wait_s: float = 60.0) -> optuna.Study:
    """Create or load study `name` and make sure each of `cells` is in it once (see "Queue" above)."""
    try:
        study, created = optuna.create_study(storage=storage, study_name=name, direction="maximize"), True
    except DuplicatedStudyError:
        study, created = optuna.load_study(study_name=name, storage=storage), False
    if OLD_LAYOUT_ATTR in study.user_attrs:
        raise SweepRefused(
            f"study {name!r} was made by the earlier claim-protocol layout (lock studies '{name}:claim:<n>'), whose "
            "cells Optuna cannot hand out; it is not resumed. Its finished cells still make a report "
            "(python sweeps/report.py --storage URL --study NAME --out DIR); to run the matrix, start a new study "
            "(another --study or --out).")
    deadline = time.monotonic() + wait_s
    while not created and QUEUED_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)  # the creator is still enqueueing
    have = {c for c in map(cell_of, study.get_trials(deepcopy=False)) if c is not None}
    missing = [c for c in cells if c not in have]
    for cell in missing:
        study.enqueue_trial(cell.params, user_attrs=cell.params, skip_if_exists=not created)
    if missing or QUEUED_ATTR not in study.user_attrs:
        study.set_user_attr(QUEUED_ATTR, len(have | set(cells)))
    return study


def cell_of(trial: FrozenTrial | optuna.Trial) -> Cell | None:
    """The cell a trial runs (user attrs; params for studies of the earlier layout), None for a trial that is none."""
    for attrs in (trial.user_attrs, trial.params):
        if "row" in attrs and "seed" in attrs:
            return Cell.from_params(attrs)
    return None


@dataclass
class CellState:
    """All trials of one cell: its first COMPLETE one, the RUNNING ones, whether one is queued, how many FAILed."""

    complete: FrozenTrial | None = None
    running: list[FrozenTrial] = field(default_factory=list)
    waiting: bool = False
    fails: int = 0

    @property
    def given_up(self) -> bool:
        return self.complete is None and not self.running and not self.waiting and self.fails > 0


def cell_states(study: optuna.Study) -> dict[Cell, CellState]:
    """Every cell of the study (in queue order) and the state of its trials."""
    out: dict[Cell, CellState] = {}
    for t in study.get_trials(deepcopy=False):
        cell = cell_of(t)
        if cell is None:
            continue
        s = out.setdefault(cell, CellState())
        if t.state == TrialState.COMPLETE and s.complete is None:
            s.complete = t
        elif t.state == TrialState.RUNNING:
            s.running.append(t)
        s.waiting |= t.state == TrialState.WAITING
        s.fails += t.state == TrialState.FAIL
    return out


def duplicate_of(study: optuna.Study, number: int, cell: Cell) -> int | None:
    """A trial that makes trial `number` redundant: same cell and COMPLETE, or RUNNING with a lower number. Only a
    grid grown by two invocations at once can queue a cell twice; this keeps such a cell from running twice."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number != number and cell_of(t) == cell and (t.state == TrialState.COMPLETE or t.number < number):
            return t.number
    return None


def last_heartbeat(trial: FrozenTrial) -> float:
    """Unix time of a RUNNING trial's last `heartbeat_at` (its start when it has none yet)."""
    start = trial.datetime_start.timestamp() if trial.datetime_start else time.time()
    return float(trial.user_attrs.get("heartbeat_at", start))


@contextmanager
def heartbeat(trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Write `heartbeat_at` every `interval` s while the body runs (a daemon thread: it dies with the process)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                trial.set_user_attr("heartbeat_at", time.time())
            except UpdateFinishedTrialError:
                return  # failed as stale meanwhile: the result will be discarded
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale(study: optuna.Study, storage: BaseStorage, live: Liveness) -> None:
    """Fail RUNNING trials silent for longer than the grace period and re-queue their cells (see "Dead workers")."""
    if isinstance(storage, RDBStorage):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        return
    retry, now = live.retry(), time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if now - last_heartbeat(t) <= live.grace_period:
            continue
        try:
            failed = study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):
            continue  # another worker failed it first, or it finished meanwhile
        retry(study, failed)
