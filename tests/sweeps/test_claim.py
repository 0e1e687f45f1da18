"""The grid and the claim protocol on a real SQLite (and journal) Optuna storage, with an in-process runner."""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from sweeps._common import ROWS, TABLE2_ROWS, Cell, TrialSettings, build_grid, fit_args
from sweeps.ablate import SweepOptions, load, progress, work
from sweeps.claim import claim_next, open_storage, setup_study
from sweeps.trial import CellResult

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_grid_is_rows_times_seeds_in_row_order() -> None:
    assert set(TABLE2_ROWS) <= set(ROWS) and "grpo_n5" not in TABLE2_ROWS
    grid = build_grid(list(TABLE2_ROWS), [0, 1, 2])
    assert len(grid) == 18 and len(set(grid)) == 18
    assert grid[:4] == [Cell("full", 0), Cell("full", 1), Cell("full", 2), Cell("no_variants", 0)]
    assert grid[-1] == Cell("grpo", 2)
    with pytest.raises(ValueError, match="unknown rows"):
        build_grid(["full", "nope"], [0])
    with pytest.raises(ValueError, match="repeated seeds"):
        build_grid(["full"], [1, 1])
    with pytest.raises(ValueError, match="must divide"):
        TrialSettings(steps=60, val_every=7)


def test_fit_args_stack_the_row_overlay_then_user_configs() -> None:
    args = fit_args(Cell("no_rrb", 3), TrialSettings(steps=4, val_every=2, configs=("real.yaml",),
                                                    overrides=("--x", "1")), save_dir=Path("/o"), version="v")
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    assert configs == ["experiments/full.yaml", "experiments/ablate/no_rrb.yaml", "real.yaml"]
    assert args[args.index("--seed_everything") + 1] == "3" and args[-2:] == ["--x", "1"]


def _opts(tmp_path: Path, **kw: object) -> SweepOptions:
    base = dict(out=tmp_path, rows=["full", "grpo"], seeds=[0, 1, 2], poll_s=0.05, heartbeat_interval=1,
                grace_period=2, max_retries=1)
    return SweepOptions(**(base | kw))  # type: ignore[arg-type]


class FakeRunner:
    """Runs nothing: records which cell ran where and returns a value that identifies the cell."""

    def __init__(self, fail: set[Cell] | None = None, sleep: float = 0.02) -> None:
        self.calls: list[tuple[Cell, str]] = []
        self.lock, self.fail, self.sleep = threading.Lock(), fail or set(), sleep

    def __call__(self, cell: Cell, settings: TrialSettings, out: Path, number: int) -> CellResult:
        time.sleep(self.sleep)
        with self.lock:
            self.calls.append((cell, threading.current_thread().name))
        if cell in self.fail:
            return CellResult(ok=False, error="boom")
        acc = 0.1 * cell.seed + (0.5 if cell.row == "full" else 0.0)
        return CellResult(ok=True, final_accuracy=acc, best_accuracy=acc + 0.05, steps=4, wall_s=0.1)


def _trials(opts: SweepOptions) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=opts.study, storage=open_storage(opts.storage_url)).get_trials()


def test_concurrent_setup_enqueues_each_cell_once(tmp_path: Path) -> None:
    opts = _opts(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    errors: list[BaseException] = []

    def join() -> None:
        try:
            setup_study(open_storage(opts.storage_url, heartbeat_interval=1, grace_period=2), opts.study, opts.cells)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=join) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    trials = _trials(opts)
    assert sorted(Cell.from_params(t.system_attrs["fixed_params"]) for t in trials) == sorted(opts.cells)
    assert all(t.state == TrialState.WAITING for t in trials)


def test_three_workers_split_the_matrix_without_repeats(tmp_path: Path) -> None:
    opts, runner = _opts(tmp_path), FakeRunner()
    threads = [threading.Thread(target=work, args=(opts, load(opts), runner), name=f"w{i}") for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ran = collections.Counter(c for c, _ in runner.calls)
    assert ran == collections.Counter(opts.cells)  # every cell exactly once
    assert len({w for _, w in runner.calls}) > 1  # really shared
    done = [t for t in _trials(opts) if t.state == TrialState.COMPLETE]
    assert len(done) == 6
    for t in done:
        cell = Cell.from_params(t.params)
        assert t.value == pytest.approx(0.1 * cell.seed + (0.5 if cell.row == "full" else 0.0))
        assert t.user_attrs["best_accuracy"] == pytest.approx(t.value + 0.05)
    # A second invocation finds everything done and runs nothing.
    again = FakeRunner()
    assert work(opts, load(opts), again) == 0 and again.calls == []
    assert progress(load(opts), opts.cells).startswith("[ablate] 6/6 done, running: -, best full 0.600")


def test_duplicate_trial_of_a_cell_is_skipped(tmp_path: Path) -> None:
    opts, runner = _opts(tmp_path, rows=["full"], seeds=[0]), FakeRunner()
    study = load(opts)
    study.enqueue_trial({"row": "full", "seed": 0}, skip_if_exists=False)  # e.g. a grid repaired twice
    work(opts, study, runner)
    assert runner.calls == [(Cell("full", 0), threading.current_thread().name)]
    states = sorted((t.number, t.state) for t in _trials(opts))
    assert states == [(0, TrialState.COMPLETE), (1, TrialState.PRUNED)]
    assert _trials(opts)[1].user_attrs["duplicate_of"] == 0


def test_failed_cell_is_retried_then_given_up(tmp_path: Path) -> None:
    bad = Cell("grpo", 1)
    opts, runner = _opts(tmp_path, max_retries=1), FakeRunner(fail={bad})
    work(opts, load(opts), runner)
    ran = collections.Counter(c for c, _ in runner.calls)
    assert ran[bad] == 2 and all(ran[c] == 1 for c in opts.cells if c != bad)  # 1 run + 1 retry
    fails = [t for t in _trials(opts) if t.state == TrialState.FAIL]
    assert len(fails) == 2 and all(t.user_attrs["error"] == "boom" for t in fails)
    assert fails[1].user_attrs["retry_of"] == fails[0].number
    assert "given up: grpo/seed1" in progress(load(opts), opts.cells)


@pytest.mark.parametrize("journal", [False, True])
def test_stale_trial_is_failed_and_its_cell_rerun(tmp_path: Path, journal: bool) -> None:
    """A worker that claimed a cell and died (no more heartbeats) loses it to the next worker after the grace."""
    opts = _opts(tmp_path, rows=["full"], seeds=[0, 1],
                 storage=f"journal:{tmp_path / 'j.log'}" if journal else None)
    dead = load(opts)
    claimed = claim_next(dead, opts.cells)  # the "killed" worker: claimed, then silent
    assert claimed is not None
    if not journal:
        dead._storage.record_heartbeat(claimed._trial_id)
    time.sleep(2.5)  # > grace_period
    runner = FakeRunner()
    work(opts, load(opts), runner)
    assert collections.Counter(c for c, _ in runner.calls) == collections.Counter(opts.cells)
    trials = _trials(opts)
    stale = next(t for t in trials if t.number == claimed.number)
    assert stale.state == TrialState.FAIL
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == claimed.number)
    assert retry.state == TrialState.COMPLETE and retry.params == claimed.params
    assert retry.user_attrs["retry_reason"].startswith("stale")
