"""ValidateAfterTraining: the final policy is validated once after the last step, unless that step validated."""

from __future__ import annotations

import csv
from pathlib import Path

from diva_lightning.callbacks import ValidateAfterTraining
from diva_lightning.cli import run_cli
from sweeps.report import Protocol, RunData, per_seed_results, seed_curve
from sweeps.runlog import read_metrics, series, val_curve
from tests.test_module import small_args


def _metrics(cli: object) -> Path:
    return Path(cli.trainer.logger.log_dir) / "metrics.csv"  # type: ignore[attr-defined]


def _val_rows(cli: object) -> list[dict[str, str]]:
    with open(_metrics(cli)) as f:
        return [r for r in csv.DictReader(f) if r.get("val/accuracy")]


def _train_steps(cli: object) -> list[int]:
    with open(_metrics(cli)) as f:
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("rollouts/generated")]


def _run(policy: str, root: Path, steps: int, every: int) -> object:
    return run_cli(small_args(policy, root, steps=steps) + [
        "--trainer.limit_val_batches", "1.0", "--trainer.val_check_interval", str(every),
        "--trainer.callbacks+=diva_lightning.callbacks.ValidateAfterTraining"])


def _callback(cli: object) -> ValidateAfterTraining:
    return next(c for c in cli.trainer.callbacks if isinstance(c, ValidateAfterTraining))  # type: ignore[attr-defined]


def test_the_last_step_is_validated_once(tiny_policy_dir: str, tmp_path: Path) -> None:
    # 3 steps, validation every 2: Lightning validates after step 2 only; the callback adds one after step 3
    cli = _run(tiny_policy_dir, tmp_path / "a", steps=3, every=2)
    assert _callback(cli).ran and cli.trainer.global_step == 3  # type: ignore[attr-defined]
    rows = _val_rows(cli)
    assert len(rows) == 2 and [r.get("val/after_training") for r in rows] == ["", "1.0"]
    # Lightning logs the training rows at steps 0, 1, 2 (steps done - 1) and the validation inside training after
    # step 2 at step 1; the after-training validation runs once the loop has counted step 3 and is logged at 3 =
    # the last training row's step + 1 (sweeps/runlog.steps_done reads it as 3 steps done, not 4)
    assert _train_steps(cli) == [0, 1, 2]
    assert [int(r["step"]) for r in rows] == [1, 3]
    # the report reads this run: the after-training validation is the point after 3 steps (36 rollouts), not a
    # 4th step that generated no rollouts (that was a KeyError in seed_curve)
    metrics = read_metrics(_metrics(cli))
    assert [s for s, _ in val_curve(metrics)] == [2, 3]
    assert [s for s, _ in series(metrics, "rollouts/generated")] == [1, 2, 3]
    run = RunData("full", 0, metrics)
    assert [x for x, _ in seed_curve(run, "val/accuracy")] == [24.0, 36.0]
    results, windows = per_seed_results([run], Protocol())
    assert windows["val/accuracy"] == (24.0, 36.0)
    assert [r.final for r in results if r.key == "val/accuracy"] == [float(rows[1]["val/accuracy"])]
    # 2 steps, validation every 2: the last step validated already, nothing is added
    cli = _run(tiny_policy_dir, tmp_path / "b", steps=2, every=2)
    assert not _callback(cli).ran and len(_val_rows(cli)) == 1
