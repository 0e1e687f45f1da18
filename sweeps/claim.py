"""The claim protocol: how workers sharing one Optuna storage split a fixed grid without running a cell twice.

Why not `GridSampler` + `study.optimize` alone: two workers that ask at the same moment can be handed the same
grid point, and on SQLite even Optuna's pop of a WAITING trial is a read-then-write that two processes can both
win. Correctness therefore rests on one primitive every Optuna storage makes atomic: `create_new_study` with a
name that already exists raises `DuplicatedStudyError` (a unique key in an RDB, first-in-log in a journal).

1. **Grid, once.** The worker whose `create_new_study(<name>)` succeeds is the creator; it enqueues every cell as
   a WAITING trial (fixed params `row`, `seed`) and then sets the study attr `grid_size`. Others wait for that
   attr. If a creator died before setting it, a later worker takes the lock study `<name>:grid` (same primitive)
   and enqueues only the cells that have no trial yet.
2. **Claim.** A worker walks the WAITING trials in number order and takes trial n by creating the lock study
   `<name>:claim:<n>`; losing that race means someone else has it. The winner moves the trial to RUNNING.
3. **Duplicate check** (safety net for a grid repaired twice or storages with weaker guarantees): if another
   trial of the same cell is COMPLETE, or RUNNING with a lower number, the claimed trial is closed as PRUNED with
   user attr `duplicate_of` and not run.
4. **Liveness.** While a cell runs, a thread records heartbeats (Optuna's heartbeat on RDB storages; a
   `heartbeat_at` user attr on journal storages, which have none). Before each claim, every worker fails RUNNING
   trials whose heartbeat is older than the grace period (exactly once: a FINISHED trial cannot be failed
   again) and re-enqueues their cell, so a SIGKILLed worker's cell is run again by someone.
5. **Failures.** A cell whose run fails is told FAIL (log tail in user attrs) and re-enqueued while its number of
   FAIL trials is <= `max_retries`.

Why no `GridSampler` on the study: the enqueued queue *is* the grid (what `GridSampler` would walk, in a fixed
order), and workers never call `ask()`. `GridSampler` keeps its bookkeeping in a `grid_id` system attr it sets
only on trials it creates itself; on enqueued trials its `after_trial` fails (KeyError 'grid_id', Optuna 5.0)
once one grid point is left. So the sampler is left out rather than half-used.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from sweeps._common import Cell

GRID_ATTR = "grid_size"
LOCK_SUFFIX = ":claim:"


def open_storage(url: str, *, heartbeat_interval: int = 30, grace_period: int = 120,
                 max_retries: int = 2) -> BaseStorage:
    """An Optuna storage from a URL: any SQLAlchemy RDB URL (`sqlite:///x.db`, `postgresql://...`) or
    `journal:<path>` for Optuna's journal file storage (one file, no database; no native heartbeat, so the
    sweep keeps its own in a user attr). Stale trials are failed and their cell re-enqueued (`max_retries`)."""
    if heartbeat_interval < 1 or grace_period <= heartbeat_interval:
        raise ValueError(f"need 1 <= heartbeat_interval < grace_period, got {heartbeat_interval}, {grace_period}")

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        requeue(study, trial, max_retries, reason="stale: its worker stopped sending heartbeats")

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        storage: BaseStorage = JournalStorage(JournalFileBackend(url[len("journal:"):]))
        storage._sweep_liveness = (grace_period, on_stale)  # type: ignore[attr-defined]  # read by fail_stale
        return storage
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0; we rely on them knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                    heartbeat_stale_trial_callback=on_stale,
                    engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
                )
        except (sqlalchemy.exc.OperationalError, sqlalchemy.exc.IntegrityError) as err:
            # Workers opening a fresh database together race on creating its tables ("table ... already
            # exists", a second alembic_version row); the loser's next attempt finds the schema in place.
            schema_race = "already exists" in str(err) or "alembic_version" in str(err)
            if not schema_race or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _try_lock(storage: BaseStorage, name: str) -> bool:
    """Atomic test-and-set on any storage: True for the one caller that creates study `name`."""
    try:
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], study_name=name)
    except DuplicatedStudyError:
        return False
    return True


def setup_study(storage: BaseStorage, name: str, cells: list[Cell], *, wait_s: float = 60.0) -> optuna.Study:
    """Create or load the study and make sure each cell was enqueued once (protocol steps 1)."""
    created = _try_lock(storage, name)
    study = optuna.load_study(study_name=name, storage=storage)
    if created:
        _enqueue_missing(study, cells)
        return study
    deadline = time.monotonic() + wait_s
    while GRID_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)  # the creator is still enqueueing
    if GRID_ATTR not in study.user_attrs and _try_lock(storage, name + ":grid"):
        _enqueue_missing(study, cells)  # the creator died half-way
    stored = study.user_attrs.get(GRID_ATTR)
    if stored is not None and stored != len(cells):
        print(f"[ablate] note: study {name!r} holds a grid of {stored} cells, this invocation asks for "
              f"{len(cells)}; cells not yet in the study are added", flush=True)
        _enqueue_missing(study, cells)
    return study


def _enqueue_missing(study: optuna.Study, cells: list[Cell]) -> None:
    have = {cell_of(t) for t in study.get_trials(deepcopy=False) if is_cell_trial(t)}
    for cell in cells:
        if cell not in have:
            study.enqueue_trial(cell.params, skip_if_exists=False)
    study.set_user_attr(GRID_ATTR, len({*have, *cells}))


def cell_of(trial: FrozenTrial) -> Cell:
    """The cell of a trial, from its params or (still WAITING) its enqueued fixed params."""
    fixed = trial.system_attrs.get("fixed_params")  # set at enqueue: complete even while params are being set
    return Cell.from_params(fixed if fixed is not None else trial.params)


def is_cell_trial(trial: FrozenTrial) -> bool:
    return "fixed_params" in trial.system_attrs or {"row", "seed"} <= set(trial.params)


def claim_next(study: optuna.Study, cells: list[Cell]) -> optuna.Trial | None:
    """Claim one WAITING trial of `cells` (protocol steps 2-3); None when nothing is left to claim."""
    storage, wanted = study._storage, set(cells)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        if cell_of(frozen) not in wanted or not _try_lock(storage, f"{study.study_name}{LOCK_SUFFIX}{frozen.number}"):
            continue
        try:
            if not storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                continue
        except UpdateFinishedTrialError:
            continue
        trial = optuna.Trial(study, frozen._trial_id)
        cell = cell_of(frozen)
        # Record the enqueued fixed params as the trial's params (suggest returns the fixed value).
        trial.suggest_categorical("row", sorted({c.row for c in cells} | {cell.row}))
        trial.suggest_categorical("seed", sorted({c.seed for c in cells} | {cell.seed}))
        dup = duplicate_of(study, frozen.number, cell)
        if dup is not None:
            trial.set_user_attr("duplicate_of", dup)
            study.tell(trial, state=TrialState.PRUNED)
            continue
        return trial
    return None


def duplicate_of(study: optuna.Study, number: int, cell: Cell) -> int | None:
    """Number of a trial that makes trial `number` redundant: same cell, COMPLETE, or RUNNING and older."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING)):
        if t.number == number or not is_cell_trial(t):
            continue
        if cell_of(t) == cell and (t.state == TrialState.COMPLETE or t.number < number):
            return t.number
    return None


def requeue(study: optuna.Study, failed: FrozenTrial, max_retries: int, reason: str = "failed") -> bool:
    """Enqueue the failed trial's cell again unless it already failed more than `max_retries` times.

    The new trial carries `retry_of` (the failed number) and `retry_reason` (a finished trial is read-only)."""
    cell = cell_of(failed)
    fails = sum(cell_of(t) == cell for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                if is_cell_trial(t))
    if fails > max_retries:
        return False
    attrs = {"retry_of": failed.number, "retry_reason": reason}
    study.enqueue_trial(cell.params, user_attrs=attrs, skip_if_exists=False)
    return True


def fail_stale(study: optuna.Study) -> None:
    """Fail RUNNING trials whose heartbeat is older than the grace period; the storage's stale callback
    (see `open_storage`) re-enqueues their cells (protocol step 4)."""
    storage = study._storage
    if _native_heartbeat(storage):
        optuna.storages.fail_stale_trials(study)  # atomic per trial: only one worker gets to fail it
        return
    grace, on_stale = storage._sweep_liveness  # type: ignore[attr-defined]
    now = time.time()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        start = t.datetime_start.timestamp() if t.datetime_start else now
        if now - float(t.user_attrs.get("heartbeat_at", start)) <= grace:
            continue
        try:
            if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                on_stale(study, storage.get_trial(t._trial_id))
        except UpdateFinishedTrialError:
            pass  # another worker failed it first


def _native_heartbeat(storage: BaseStorage) -> bool:
    """RDB storages (Optuna wraps them in a cache) have heartbeats; the journal storage does not."""
    return hasattr(storage, "record_heartbeat") and not hasattr(storage, "_sweep_liveness")


@contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial, interval: float) -> Iterator[None]:
    """Keep `trial` alive while the body runs (a daemon thread; it dies with the process, as it must)."""
    storage, stop = study._storage, threading.Event()

    def beat() -> None:
        while True:
            if _native_heartbeat(storage):
                storage.record_heartbeat(trial._trial_id)  # type: ignore[attr-defined]
            else:
                storage.set_trial_user_attr(trial._trial_id, "heartbeat_at", time.time())
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def cell_states(study: optuna.Study, cells: list[Cell]) -> dict[Cell, dict[str, Any]]:
    """Per cell: its COMPLETE trial (if any), whether a trial is RUNNING/WAITING, and its FAIL count."""
    out: dict[Cell, dict[str, Any]] = {c: {"complete": None, "running": False, "waiting": False, "fails": 0}
                                       for c in cells}
    for t in study.get_trials(deepcopy=False):
        if not is_cell_trial(t):
            continue
        c = cell_of(t)
        if c not in out:
            continue
        if t.state == TrialState.COMPLETE and out[c]["complete"] is None:
            out[c]["complete"] = t
        elif t.state == TrialState.RUNNING:
            out[c]["running"] = True
        elif t.state == TrialState.WAITING:
            out[c]["waiting"] = True
        elif t.state == TrialState.FAIL:
            out[c]["fails"] += 1
    return out
