"""The grid, the queue and the retries on a real journal-file Optuna storage, one in-process worker whose cells run
through a plain function (the multi-process guarantees, on PostgreSQL too, are in test_ablate_runs.py)."""

from __future__ import annotations

import collections
import dataclasses
import re
import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from sweeps._common import ROWS, TABLE2_ROWS, Cell, TrialSettings, build_grid, fit_args
from sweeps.ablate import SweepOptions, load, parse_args, progress, run_sweep, waiting_for, work
from sweeps.missing import missing_cells
from sweeps.study import Liveness, SweepRefused, cell_of, open_storage
from sweeps.trial import CellResult
from tests.sweeps.runners import CsvRunner

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def test_grid_is_rows_times_seeds_in_row_order() -> None:
    assert set(TABLE2_ROWS) <= set(ROWS) and "grpo_n5" not in TABLE2_ROWS and "dapo" not in TABLE2_ROWS
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
    base = dict(out=tmp_path, rows=["full", "grpo"], seeds=[0, 1], poll_s=0.05,
                live=Liveness(heartbeat_interval=1, grace_period=2, max_retries=1))
    return SweepOptions(**(base | kw))  # type: ignore[arg-type]


class PlainRunner:
    """Runs no fit: records each cell it is given and returns a value that identifies the cell."""

    def __init__(self, fail: set[Cell] | None = None) -> None:
        self.calls: list[Cell] = []
        self.fail = fail or set()

    def __call__(self, cell: Cell, settings: TrialSettings, out: Path, number: int) -> CellResult:
        self.calls.append(cell)
        if cell in self.fail:
            return CellResult(ok=False, error="boom")
        acc = 0.1 * cell.seed + (0.5 if cell.row == "full" else 0.0)
        return CellResult(ok=True, final_accuracy=acc, best_accuracy=acc + 0.05, steps=4, wall_s=0.1)


def _trials(opts: SweepOptions) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=opts.study, storage=open_storage(opts.storage_url)).get_trials()


def test_queued_once_run_once_and_a_finished_study_runs_nothing(tmp_path: Path) -> None:
    opts, runner = _opts(tmp_path), PlainRunner()
    assert work(opts, runner) == 4 and runner.calls == opts.cells  # queue order = grid order
    trials = _trials(opts)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    for t in trials:
        cell = cell_of(t)
        assert cell is not None and t.value == pytest.approx(0.1 * cell.seed + (0.5 if cell.row == "full" else 0))
        assert t.user_attrs["best_accuracy"] == pytest.approx(t.value + 0.05) and t.user_attrs["error"] is None
    again = PlainRunner()
    assert work(opts, again) == 0 and again.calls == [] and len(_trials(opts)) == 4
    assert progress(load(opts)[0]) == "[ablate] 4/4 done, running: -, best full 0.550"
    # A grown grid: only the new cells are queued and run.
    more = PlainRunner()
    assert work(_opts(tmp_path, seeds=[0, 1, 2]), more) == 2 and more.calls == [Cell("full", 2), Cell("grpo", 2)]


def test_failed_cell_is_retried_then_given_up(tmp_path: Path) -> None:
    bad = Cell("grpo", 1)
    opts, runner = _opts(tmp_path), PlainRunner(fail={bad})
    work(opts, runner)
    ran = collections.Counter(runner.calls)
    assert ran[bad] == 2 and all(ran[c] == 1 for c in opts.cells if c != bad)  # 1 run + max_retries=1
    fails = [t for t in _trials(opts) if t.state == TrialState.FAIL]
    assert len(fails) == 2 and all(t.user_attrs["error"] == "boom" for t in fails)
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(fails[1]) == fails[0].number
    assert "given up: grpo/seed1" in progress(load(opts)[0])


def test_a_cell_queued_twice_runs_once(tmp_path: Path) -> None:
    opts, runner = _opts(tmp_path, rows=["full"], seeds=[0]), PlainRunner()
    study, _ = load(opts)
    study.enqueue_trial({"row": "full", "seed": 0}, user_attrs={"row": "full", "seed": 0})  # two growers at once
    work(opts, runner)
    assert runner.calls == [Cell("full", 0)]
    assert [(t.number, t.state) for t in _trials(opts)] == [(0, TrialState.COMPLETE), (1, TrialState.PRUNED)]
    assert _trials(opts)[1].user_attrs["duplicate_of"] == 0


def test_silent_running_cell_is_failed_and_retried_on_the_journal(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The journal has no Optuna heartbeat: a trial popped by a worker that then died (no `heartbeat_at`) is failed
    after the grace period by the next worker, which says what it waits for, and its cell is run again."""
    opts = _opts(tmp_path, rows=["full"], seeds=[0, 1])
    dead = load(opts)[0].ask()  # the "killed" worker: popped the first queued cell, then silence
    assert cell_of(dead) == Cell("full", 0)
    text, key = waiting_for(load(opts)[0], opts.live)
    assert key == ((0, False),) and "for full/seed0 (trial 0, running elsewhere)" in text
    time.sleep(2.2)  # > grace_period
    text, key = waiting_for(load(opts)[0], opts.live)
    # the seconds are wall-clock (a loaded machine reads "silent 3 s" after this 2.2 s sleep): match the shape
    assert key == ((0, True),) and re.search(r"\d+ s for a stale cell's heartbeat \(full/seed0, trial 0, silent \d+ s",
                                             text), text
    runner = PlainRunner()
    work(opts, runner)
    assert sorted(runner.calls) == opts.cells
    assert ("[ablate] stale: full/seed0 (trial 0, worker ?) sent no heartbeat for over 2 s; failed as stale, cell "
            "re-queued") in capsys.readouterr().out
    trials = _trials(opts)
    assert trials[0].state == TrialState.FAIL
    retry = next(t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0)
    assert retry.state == TrialState.COMPLETE and cell_of(retry) == Cell("full", 0)


def test_refused_storages_and_studies_say_why(tmp_path: Path) -> None:
    with pytest.raises(SweepRefused, match="SQLite cannot hand out cells"):
        open_storage(f"sqlite:///{tmp_path / 'x.db'}")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "study.db").touch()  # the earlier default storage
    with pytest.raises(SweepRefused, match="earlier layout .* sweeps/report.py --storage sqlite:///"):
        load(_opts(tmp_path / "old"))
    # A study of the earlier claim-protocol layout (it marked itself with `grid_size`) is not resumed.
    url = f"journal:{tmp_path / 'old.journal'}"
    optuna.create_study(study_name="diva-ablate", storage=open_storage(url)).set_user_attr("grid_size", 4)
    with pytest.raises(SweepRefused, match="earlier claim-protocol layout"):
        load(_opts(tmp_path, storage=url))
    with pytest.raises(ValueError, match="has no {args}"):
        _opts(tmp_path, launcher="torchrun -m diva_lightning")


def test_missing_cells_are_named_and_given_up_cells_retried_on_request(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = Cell("grpo", 1)
    opts = _opts(tmp_path, live=Liveness(heartbeat_interval=1, grace_period=2, max_retries=0))
    # Queued, nothing run yet: every cell is "never started".
    assert [why for _, why in missing_cells(load(opts)[0])] == ["never started (still queued)"] * 4
    run_sweep(opts, runner=CsvRunner(fail={bad}))
    log = capsys.readouterr().out
    why = "gave up after 1 try (last: trial 3: boom; log "
    assert f"[ablate] no result: grpo/seed1: {why}" in log and "1 of 4 cells without a result" in log
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("# DIVA-GRPO ablation (Table 2 form)\n\n## Cells without a result\n")
    assert f"| grpo/seed1 | {why}" in report and "--retry-given-up" in report
    # A rerun without the flag runs nothing and says why; the report still names the cell.
    again = CsvRunner()
    run_sweep(opts, runner=again)
    assert again.calls == [] and "given up earlier, not retried: grpo/seed1 (pass --retry-given-up" in (
        capsys.readouterr().out)
    assert f"| grpo/seed1 | {why}" in (tmp_path / "report.md").read_text()
    # With the flag the cell runs once more; the report is complete.
    retry = CsvRunner()
    run_sweep(dataclasses.replace(opts, retry_given_up=True), runner=retry)
    assert retry.calls == [bad] and "queued grpo/seed1 again" in capsys.readouterr().out
    assert "Cells without a result" not in (tmp_path / "report.md").read_text()
    assert "| grpo | 2 |" in (tmp_path / "table2.md").read_text()
    flags = parse_args(["--retry-given-up", "--storage-patience", "7.5"])
    assert flags.retry_given_up and flags.live.storage_patience == 7.5
