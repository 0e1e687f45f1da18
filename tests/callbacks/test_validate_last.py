"""ValidateAfterTraining: the final policy is validated once after the last step, unless that step validated."""

from __future__ import annotations

import csv
from pathlib import Path

from diva_lightning.callbacks import ValidateAfterTraining
from diva_lightning.cli import run_cli
from tests.test_module import small_args


def _val_rows(cli: object) -> list[dict[str, str]]:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[attr-defined]
        return [r for r in csv.DictReader(f) if r.get("val/accuracy")]


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
    assert int(rows[1]["step"]) > int(rows[0]["step"])
    # 2 steps, validation every 2: the last step validated already, nothing is added
    cli = _run(tiny_policy_dir, tmp_path / "b", steps=2, every=2)
    assert not _callback(cli).ran and len(_val_rows(cli)) == 1
