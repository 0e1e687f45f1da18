"""The sweep rides out database faults on the real PostgreSQL server of the tests (tests/sweeps/conftest.py): the
server is restarted mid-cell, right after a cell's fit (the first query then meets a dead pooled connection), and
stopped for 4 s while the heartbeats (ours and Optuna's) write. Every cell completes exactly once (no retries are
allowed: --max-retries 0), and the report equals a clean run's. An outage longer than the storage patience stops the
worker with one line, and the finished fit is kept: the cell's retry takes it without fitting again.

The first two tests run their cells through a plain function (no fit: the faults are the database's, and a fit's
timings would make two reports differ) that writes a fixed metrics.csv per cell, as a fit's CSVLogger would, and
plays the fault. The third runs the CLI with two worker processes and real 1-step fits, and takes the server down
while they run."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from sweeps._common import Cell, TrialSettings
from sweeps.ablate import SweepOptions, run_sweep, work
from sweeps.study import Liveness, StorageUnavailable, cell_of, fail_stale, open_storage
from tests.sweeps.conftest import PostgresServer
from tests.sweeps.runners import CsvRunner
from tests.sweeps.test_ablate_runs import ablate, complete_cells, finish, trials

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              # a heartbeat thread that dies of an exception fails the test
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]

CELLS = [Cell("full", 0), Cell("full", 1), Cell("grpo", 0), Cell("grpo", 1)]


def _opts(out: Path, storage: str, **live: float) -> SweepOptions:
    return SweepOptions(out=out, storage=storage, rows=["full", "grpo"], seeds=[0, 1], poll_s=0.2,
                        settings=TrialSettings(steps=2, val_every=1),
                        live=Liveness(**({"heartbeat_interval": 1, "grace_period": 15, "max_retries": 0} | live)))


def _trials(opts: SweepOptions) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=opts.study, storage=open_storage(opts.storage_url, opts.live)).get_trials()


def _report(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text() for name in ("report.md", "table2.csv", "efficiency.csv")}


def test_restarts_mid_cell_after_fit_and_in_heartbeats(postgres: PostgresServer, postgres_url: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def fault(cell: Cell) -> None:
        if cell == CELLS[0]:  # mid-cell: heartbeats before and after a sub-second restart
            time.sleep(1.5)
            postgres.restart()
            time.sleep(1.5)
        elif cell == CELLS[1]:  # a 4 s outage while both heartbeat threads write every second
            postgres.stop()
            time.sleep(4.0)
            postgres.start()
        elif cell == CELLS[2]:  # right after the "fit": the result's writes are the first queries after it
            postgres.restart()

    faulty = _opts(tmp_path / "faulty", postgres_url)
    runner = CsvRunner(fault)
    run_sweep(faulty, runner=runner)
    log = capsys.readouterr().out
    assert runner.calls == CELLS  # each cell ran once
    trials = _trials(faulty)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert collections.Counter(cell_of(t) for t in trials) == collections.Counter(CELLS)
    assert "[ablate] database unreachable at" in log and "[ablate] database back after" in log
    assert "stale" not in log and "FAILED" not in log and "no result" not in log

    clean = _opts(tmp_path / "clean", f"journal:{tmp_path / 'clean.journal'}")
    run_sweep(clean, runner=CsvRunner())
    assert _report(tmp_path / "faulty") == _report(tmp_path / "clean")
    assert "Cells without a result" not in _report(tmp_path / "faulty")["report.md"]


def test_outage_past_patience_stops_with_one_line_and_keeps_the_fit(postgres: PostgresServer, postgres_url: str,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    def fault(cell: Cell) -> None:
        postgres.stop()  # down until the test starts it again

    opts = _opts(tmp_path, postgres_url, grace_period=3, max_retries=1, storage_patience=2)
    opts.rows, opts.seeds = ["full"], [0]
    runner = CsvRunner(fault)
    try:
        with pytest.raises(StorageUnavailable, match=r"unreachable for \d+ s \(--storage-patience 2\) at "):
            work(opts, runner)
    finally:
        postgres.start()
    assert runner.calls == [Cell("full", 0)]
    # The next invocation fails the silent trial as stale, and its retry takes the kept result instead of a fit.
    again = CsvRunner()
    work(opts, again)
    log = capsys.readouterr().out
    assert again.calls == []
    assert "[ablate] stale: full/seed0 (trial 0" in log and "cell re-queued" in log
    assert "keeping the finished result of trial 0" in log
    first, retry = _trials(opts)
    assert (first.state, retry.state) == (TrialState.FAIL, TrialState.COMPLETE)
    assert retry.value == pytest.approx(0.5) and retry.user_attrs["kept_from_trial"] == 0


def test_real_fits_ride_out_a_restart_and_an_outage(postgres: PostgresServer, postgres_url: str,
                                                    tiny_policy_dir: str, tmp_path: Path) -> None:
    """The CLI with two worker processes and real 1-step fits of the tiny policy: the server restarts while both fits
    run and is down for 3 s a moment later. No cell fails (--max-retries 0) and table2.csv equals a clean run's."""
    args = ["--rows", "full", "--seeds", "0", "1", "--steps", "1", "--val-every", "1", "--workers", "2",
            "--max-retries", "0", "--heartbeat-interval", "1", "--grace-period", "30", "--poll", "0.5"]
    proc = ablate(tmp_path / "faulty", tiny_policy_dir, "--storage", postgres_url, *args)
    logs = tmp_path / "faulty" / "logs"
    deadline = time.monotonic() + 180
    while not logs.exists() or len(list(logs.iterdir())) < 2:  # both workers' fits under way
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    time.sleep(1.0)
    postgres.restart()
    time.sleep(1.0)
    postgres.stop()
    time.sleep(3.0)
    postgres.start()
    log = finish(proc)
    assert "Traceback" not in log and "FAILED" not in log and "[ablate] 2/2 done" in log
    assert "[ablate] database unreachable at" in log and "[ablate] database back after" in log  # it was noticed
    done = trials(tmp_path, postgres_url)
    assert all(t.state == TrialState.COMPLETE for t in done)
    assert complete_cells(done) == collections.Counter({("full", 0): 1, ("full", 1): 1})
    finish(ablate(tmp_path / "clean", tiny_policy_dir, *args))
    assert (tmp_path / "faulty" / "table2.csv").read_text() == (tmp_path / "clean" / "table2.csv").read_text()


def _cell_trial(url: str, live: Liveness) -> tuple[optuna.Study, object, int]:
    """A study on `url` with one cell's trial popped (RUNNING, as a worker holds it) and its database id."""
    storage = open_storage(url, live)
    study = optuna.create_study(storage=storage, study_name="stale")
    study.enqueue_trial(CELLS[0].params, user_attrs=CELLS[0].params)
    trial = study.ask()
    return study, storage, storage.get_trial_id_from_study_id_trial_number(  # type: ignore[attr-defined]
        storage.get_study_id_from_name("stale"), trial.number)  # type: ignore[attr-defined]


def test_an_outage_past_the_grace_period_fails_no_live_cell(postgres: PostgresServer, postgres_url: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A waiting worker whose stale check rides out an outage longer than the grace period (but within the patience)
    fails nothing until its worker has had a grace period to beat again; a cell that stays silent is failed then."""
    live = Liveness(heartbeat_interval=1, grace_period=3, max_retries=1, storage_patience=60)
    study, storage, trial_id = _cell_trial(postgres_url, live)

    def beat() -> None:  # what a live worker's two heartbeat threads write
        storage.record_heartbeat(trial_id)  # type: ignore[attr-defined]
        storage.set_trial_user_attr(trial_id, "heartbeat_at", time.time())

    beat()
    postgres.stop()
    threading.Timer(4.5, postgres.start).start()  # down for longer than the grace period
    assert fail_stale(study, storage, live) == []  # the check's first query waits for the server, then holds off
    assert "[ablate] database back after" in capsys.readouterr().out
    time.sleep(1.5)
    beat()  # the live worker beats again
    time.sleep(2.0)  # a grace period since the server came back; the last beat is 2 s old
    assert fail_stale(study, storage, live) == []
    time.sleep(3.5)  # now silent for longer than the grace period: a dead worker
    assert fail_stale(study, storage, live) == [0]
    assert "failed as stale, cell re-queued" in capsys.readouterr().out


def test_a_running_trial_without_optuna_heartbeat_is_failed(postgres_url: str) -> None:
    """A pop whose commit went through but whose answer was lost leaves a RUNNING trial that no worker runs and that
    never got Optuna's heartbeat (Optuna's stale check skips it); the sweep's check fails it after the grace period
    from its start, and its cell is queued again."""
    live = Liveness(heartbeat_interval=1, grace_period=2, max_retries=1)
    study, storage, _ = _cell_trial(postgres_url, live)
    assert fail_stale(study, storage, live) == []  # just started
    time.sleep(2.5)
    assert fail_stale(study, storage, live) == [0]
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]  # re-queued by the retry callback


def test_settings_no_wait_cures_fail_at_once(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A misspelt database name is not an outage: it fails on the first try, without waiting out the patience."""
    with pytest.raises(sqlalchemy.exc.OperationalError, match="does not exist"):
        open_storage(postgres_url + "_typo", Liveness(storage_patience=600))
    assert "retrying" not in capsys.readouterr().out
