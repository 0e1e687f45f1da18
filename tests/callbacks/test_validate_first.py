"""ValidateBeforeTraining: the base policy's score is logged at step 0, once, and never again on a resume."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from diva_lightning.callbacks import ValidateBeforeTraining
from diva_lightning.cli import run_cli
from sweeps.runlog import read_metrics, val_curve
from tests.test_module import small_args


def _val_rows(cli: object) -> list[dict[str, str]]:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[attr-defined]
        return [r for r in csv.DictReader(f) if r.get("val/accuracy")]


def _callback(cli: object) -> ValidateBeforeTraining:
    return next(c for c in cli.trainer.callbacks if isinstance(c, ValidateBeforeTraining))  # type: ignore[attr-defined]


def _args(policy: str, root: Path, steps: int) -> list[str]:
    # validation every 2 steps on the world's 8 validation questions; small_args switches validation off
    return small_args(policy, root, steps=steps) + [
        "--trainer.limit_val_batches", "1.0", "--trainer.val_check_interval", "2",
        "--trainer.callbacks+=diva_lightning.callbacks.ValidateBeforeTraining"]


def test_validation_before_training_is_logged_at_step_zero(tiny_policy_dir: str, tmp_path: Path) -> None:
    cli = run_cli(_args(tiny_policy_dir, tmp_path, steps=2))
    assert _callback(cli).ran
    rows = _val_rows(cli)
    # before the first step (step 0), then after step 2 (Lightning logs it at its step counter 1)
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(0.0 <= float(r["val/accuracy"]) <= 1.0 for r in rows)
    assert cli.trainer.global_step == 2
    # the base policy's row is marked, and a sweep's training curve leaves it out (else it reads as "after 1 step")
    assert [r.get("val/before_training") for r in rows] == ["1.0", ""]
    curve = val_curve(read_metrics(Path(cli.trainer.logger.log_dir) / "metrics.csv"))
    assert curve == [(2, float(rows[1]["val/accuracy"]))]


@pytest.mark.slow
def test_resumed_run_does_not_validate_before_training(tiny_policy_dir: str, tmp_path: Path) -> None:
    cli = run_cli(_args(tiny_policy_dir, tmp_path / "a", steps=2))
    ckpt = tmp_path / "step2.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    resumed = run_cli(_args(tiny_policy_dir, tmp_path / "b", steps=4) + ["--ckpt_path", str(ckpt)])
    assert not _callback(resumed).ran  # a resumed run starts at step 2: the base policy was validated already
    assert resumed.trainer.global_step == 4
    (row,) = _val_rows(resumed)  # only the scheduled validation after step 4, nothing before the first resumed step
    assert int(row["step"]) >= 3
