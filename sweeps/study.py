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
  storages too: waiting workers say how long a silent cell has left, and `fail_stale` fails a cell's trial whose
  `heartbeat_at` (or start) is older than the grace period, which catches a trial that Optuna's check skips because
  it never got an Optuna heartbeat (a pop whose answer was lost). No worker fails a trial as stale until a grace
  period after its storage last came back from an outage.
- **Failed fits** are re-queued by the same callback; after `max_retries` retries the cell is given up.
- **Database faults.** An RDB storage is opened with `pool_pre_ping` (Optuna turns it on only for MySQL), so the first
  query after a server restart gets a fresh connection instead of a dead pooled one. Every storage call of the
  sweep (Optuna's own: pop, heartbeat, tell; ours: user attrs, reads for the queue and the report) goes through
  `PatientRDBStorage`, which retries a lost connection with backoff for `Liveness.storage_patience` s, says so in one
  line, and then raises `StorageUnavailable` (one line, no traceback, exit 1); only connection-class errors are
  retried (`lost_connection`), so a failed authentication or a misspelt database name fails at once.
  Heartbeats never end their thread: a beat that cannot be written is skipped and said so.
"""

from __future__ import annotations

import functools
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import optuna
import sqlalchemy.exc
from optuna.exceptions import (
    DuplicatedStudyError,
    ExperimentalWarning,
    StorageInternalError,
    UpdateFinishedTrialError,
)
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from sweeps._common import Cell

QUEUED_ATTR = "queued"  # study attr: number of cells enqueued, set once the queue is complete
OLD_LAYOUT_ATTR = "grid_size"  # study attr of the earlier claim-protocol layout (lock studies per cell)


class SweepRefused(ValueError):
    """A storage or study this version cannot run the matrix on (the message says why and what to do)."""


class StorageUnavailable(RuntimeError):
    """The study's database stayed unreachable for longer than `Liveness.storage_patience` (the message says where)."""


@dataclass(frozen=True)
class Liveness:
    """How a dead worker's cell comes back: silence after which it is failed, and how often a cell is retried."""

    heartbeat_interval: int = 30
    grace_period: int = 120
    max_retries: int = 2
    storage_patience: float = 300.0  # seconds a storage call retries a lost database connection before giving up

    def __post_init__(self) -> None:
        if not 1 <= self.heartbeat_interval < self.grace_period or self.max_retries < 0 or self.storage_patience < 0:
            raise ValueError(f"need 1 <= heartbeat_interval < grace_period, max_retries >= 0 and storage_patience >= "
                             f"0, got {self.heartbeat_interval}, {self.grace_period}, {self.max_retries}, "
                             f"{self.storage_patience}")

    def retry(self) -> RetryHeartbeatStaleTrialCallback:
        with warnings.catch_warnings():  # experimental in Optuna 5.0; we rely on it knowingly
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RetryHeartbeatStaleTrialCallback(max_retry=self.max_retries)


T = TypeVar("T")


# MySQL server errors that no wait cures: access denied (to a database, for a user), unknown database.
_MYSQL_NOT_CONNECTION = {1044, 1045, 1049}


def _connection_class(orig: object) -> bool:
    """Whether the driver error behind a SQLAlchemy OperationalError/InterfaceError is about reaching the server.
    PostgreSQL names it by SQLSTATE: class 08 (connection exception) and 57P0x (the server shutting down, restarting
    or still starting up) are; any other code the server answered with (28xxx failed authentication, 3D000 unknown
    database, ...) is not. libpq gives no SQLSTATE for an error at connect time, only its message: a server that
    answered with FATAL (bad password, unknown database) is not connection class unless it said it is starting up,
    shutting down, in recovery or full. Otherwise no SQLSTATE means the server never answered (refused, reset, timed
    out): connection class. MySQL (pymysql) gives a numeric code instead."""
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if state:
        return str(state).startswith(("08", "57P"))
    text = str(orig)
    if "FATAL:" in text:
        return any(s in text for s in ("starting up", "shutting down", "recovery", "too many"))
    code = (getattr(orig, "args", None) or (None,))[0]
    return not (isinstance(code, int) and code in _MYSQL_NOT_CONNECTION)


def lost_connection(err: BaseException) -> bool:
    """Whether `err` is a database connection that went away or cannot be made (a server restart or outage), as
    opposed to a bad query or a setting no wait cures (a failed authentication, a misspelt database name, which fail
    at once): an invalidated connection, or SQLAlchemy's OperationalError/InterfaceError of the connection class
    (`_connection_class`), also when Optuna wrapped it in StorageInternalError."""
    for e in (err, err.__cause__):
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)):
            return _connection_class(e.orig)
    return False


def _reason(err: BaseException) -> str:
    cause = err.__cause__ if isinstance(err, StorageInternalError) and err.__cause__ else err
    lines = [ln for ln in str(getattr(cause, "orig", None) or cause).splitlines() if ln.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}".strip()


def patiently(what: str, call: Callable[[], T], patience: float, *, on_retry: Callable[[], T | None] | None = None,
              on_back: Callable[[], None] | None = None,
              say: Callable[[str], None] = lambda line: print(line, flush=True)) -> T:
    """`call()`, retried with backoff (0.1 s doubling to 2 s) while it fails on a lost database connection, for at
    most `patience` s; then StorageUnavailable naming `what`. Says one line when it starts retrying and one when the
    database is back. `on_retry`, if given, runs before each retry and may return the result instead (a write whose
    first try committed but whose answer was lost). `on_back`, if given, runs when a call succeeds after retries."""
    start, delay, tries = time.monotonic(), 0.1, 0
    while True:
        try:
            if tries and on_retry is not None:
                done = on_retry()
                if done is not None:
                    return done
            result = call()
        except Exception as err:
            if not lost_connection(err):
                raise
            waited = time.monotonic() - start
            if waited >= patience:
                raise StorageUnavailable(
                    f"the study's database has been unreachable for {waited:.0f} s (--storage-patience "
                    f"{patience:g}) at {what}: {_reason(err)}. Finished cells are kept in the study; run the same "
                    "command again once the database is back") from err
            if not tries:
                say(f"[ablate] database unreachable at {what} ({_reason(err)}); retrying for up to {patience:g} s")
            tries += 1
            time.sleep(min(delay, max(0.0, patience - waited)))
            delay = min(2 * delay, 2.0)
            continue
        if tries:
            say(f"[ablate] database back after {time.monotonic() - start:.1f} s ({what})")
            if on_back is not None:
                on_back()
        return result


# The storage API that touches the database (the BaseStorage and BaseHeartbeat public methods RDBStorage implements).
_PATIENT_METHODS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr", "get_study_id_from_name",
    "get_study_name_from_id", "get_study_directions", "get_study_user_attrs", "get_study_system_attrs",
    "get_all_studies", "create_new_trial", "set_trial_param", "get_trial_param", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number", "get_trial",
    "get_all_trials", "get_best_trial", "get_trial_user_attrs", "get_trial_system_attrs",
)


class PatientRDBStorage(RDBStorage):
    """`RDBStorage` that checks pooled connections before use and rides out a database restart (module docstring).

    Retrying is safe for every call the sweep makes: attribute writes are idempotent; a finishing state change whose
    first try committed but whose answer was lost is recognised on the retry (`set_trial_state_values`); a pop
    (WAITING -> RUNNING) whose answer was lost is not (the retry sees the trial taken and Optuna pops another), and
    its trial, RUNNING with no worker and no Optuna heartbeat, is failed by `fail_stale`'s own check; a trial created
    twice
    is either a cell queued twice (run once, `duplicate_of`) or a trial with no cell (pruned at once)."""

    def __init__(self, url: str, *, patience: float, **kwargs: object) -> None:
        self.patience = patience
        self.back_at = -math.inf  # time.monotonic() when a call of this storage last got through after retries
        super().__init__(url, engine_kwargs={"pool_pre_ping": True}, **kwargs)  # type: ignore[arg-type]

    def came_back(self) -> None:
        self.back_at = time.monotonic()

    def since_back(self) -> float:
        """Seconds since this storage last rode out an outage (inf: never)."""
        return time.monotonic() - self.back_at

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: object = None) -> bool:
        def committed_before() -> bool | None:
            # The first try may have committed before the connection dropped: then the trial already holds `state`.
            if state.is_finished() and RDBStorage.get_trial(self, trial_id).state == state:
                return True
            return None

        return patiently(f"set_trial_state_values(trial id {trial_id}, {state.name})",
                         lambda: RDBStorage.set_trial_state_values(self, trial_id, state, values),  # type: ignore
                         self.patience, on_retry=committed_before, on_back=self.came_back)

    def record_heartbeat(self, trial_id: int) -> None:
        """Optuna's heartbeat thread calls this every interval; it must not end the thread (a skipped beat only
        brings the cell nearer to its grace period, which then retries it)."""
        try:
            patiently(f"Optuna's heartbeat (trial id {trial_id})", lambda: RDBStorage.record_heartbeat(self, trial_id),
                      self.patience, on_back=self.came_back)
        except StorageUnavailable as err:
            print(f"[ablate] Optuna's heartbeat (trial id {trial_id}) skipped: {err}", flush=True)


def _patient(name: str) -> Callable[..., object]:
    base = getattr(RDBStorage, name)

    @functools.wraps(base)
    def method(self: PatientRDBStorage, *args: object, **kwargs: object) -> object:
        return patiently(f"{name}{args!r}"[:120], lambda: base(self, *args, **kwargs), self.patience,
                         on_back=self.came_back)

    return method


for _name in _PATIENT_METHODS:
    if _name in vars(RDBStorage):  # the base class's others call these
        setattr(PatientRDBStorage, _name, _patient(_name))


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
    def connect() -> BaseStorage:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():  # heartbeats are experimental in Optuna 5.0
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    return PatientRDBStorage(url, patience=live.storage_patience,
                                             heartbeat_interval=live.heartbeat_interval,
                                             grace_period=live.grace_period,
                                             heartbeat_stale_trial_callback=live.retry())
            except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError,
                    sqlalchemy.exc.ProgrammingError) as e:
                # Workers opening a fresh database together race on creating its tables; the loser's next try finds
                # them.
                if "already exists" not in str(e) and "duplicate key" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    return patiently(f"opening {url}", connect, live.storage_patience)


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
    """Write `heartbeat_at` every `interval` s while the body runs (a daemon thread: it dies with the process). A beat
    that cannot be written (the database is away for longer than the storage's patience) is skipped with a line."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                trial.set_user_attr("heartbeat_at", time.time())
            except UpdateFinishedTrialError:
                return  # failed as stale meanwhile: the result will be discarded
            except Exception as err:  # noqa: BLE001 - a missed beat must not end the thread (the cell runs on)
                print(f"[ablate] heartbeat of trial {trial.number} skipped ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); next try in {interval:g} s", flush=True)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def fail_stale(study: optuna.Study, storage: BaseStorage, live: Liveness,
               say: Callable[[str], None] = lambda line: print(line, flush=True)) -> list[int]:
    """Fail RUNNING trials silent for longer than the grace period and re-queue their cells (see "Dead workers"); say
    one line per trial seen failed (here, or by another worker's check at the same time). Returns their numbers.

    On an RDB storage: Optuna's `fail_stale_trials` fails the trials whose Optuna heartbeat is stale, and then the
    trials with a cell whose own `heartbeat_at` (or start) is older than the grace period are failed as on a journal:
    Optuna skips a trial that never got its heartbeat, such as one whose pop committed but whose answer was lost
    (its worker ran another trial), which would otherwise stay RUNNING for ever. Nothing is failed until a grace
    period has passed since this worker's storage last rode out an outage: a live cell's heartbeats could not be
    written during it either, so its silence says nothing until its worker has had a grace period to beat again."""
    patient = storage if isinstance(storage, PatientRDBStorage) else None

    def read(state: TrialState) -> list[FrozenTrial]:
        # Optuna's study reads an RDB storage's trials through its cache, which calls a private method of
        # RDBStorage that PatientRDBStorage does not wrap: the read is made patient here.
        return patiently(f"reading {state.name} trials", lambda: study.get_trials(deepcopy=False, states=(state,)),
                         live.storage_patience, on_back=None if patient is None else patient.came_back)

    running = {t.number: t for t in read(TrialState.RUNNING)}
    if patient is not None and patient.since_back() < live.grace_period:
        return []
    failed: list[int] = []
    if isinstance(storage, RDBStorage) and running:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            patiently("failing stale trials", lambda: optuna.storages.fail_stale_trials(study),
                      live.storage_patience)
        failed = [t.number for t in read(TrialState.FAIL) if t.number in running]
    retry, now = live.retry(), time.time()
    for t in running.values():
        if t.number in failed or now - last_heartbeat(t) <= live.grace_period:
            continue
        if isinstance(storage, RDBStorage) and cell_of(t) is None:
            continue  # not a cell of the sweep: Optuna's own check decides
        try:
            frozen = study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, UpdateFinishedTrialError):
            continue  # another worker failed it first, or it finished meanwhile
        retry(study, frozen)
        failed.append(t.number)
    if failed:
        states = cell_states(study)
        for number in failed:
            t, cell = running[number], cell_of(running[number])
            if cell is None:
                continue
            s = states[cell]
            fate = ("re-queued" if s.waiting or s.running or s.complete else
                    f"given up after {s.fails} failed tries (--max-retries {live.max_retries})")
            say(f"[ablate] stale: {cell.name} (trial {number}, worker {t.user_attrs.get('worker', '?')}) sent no "
                f"heartbeat for over {live.grace_period} s; failed as stale, cell {fate}")
    return failed
