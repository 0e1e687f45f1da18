"""The callbacks work in a LightningModule that is not ours (tests/helpers/foreign.py), with a real Trainer."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from diva_lightning.callbacks import AdvantageMonitor, DifficultyCallback
from diva_lightning.callbacks.advantage_monitor import monitor_metrics, rank_dependent
from tests.helpers.foreign import ForeignModule, loader

REPO = Path(__file__).resolve().parents[2]


def _fit(tmp_path: Path, callbacks: list[pl.Callback], steps: int, ckpt_path: str | None = None,
         max_steps: int = -1) -> pl.Trainer:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, max_steps=max_steps, logger=CSVLogger(tmp_path),
                         callbacks=callbacks, enable_progress_bar=False, default_root_dir=tmp_path,
                         enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                         log_every_n_steps=1)
    trainer.fit(ForeignModule(), train_dataloaders=loader(["q0", "q1", "q2"], steps), ckpt_path=ckpt_path)
    return trainer


def _rows(trainer: pl.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_difficulty_follows_linear_rule_by_hand(tmp_path: Path) -> None:
    cb = DifficultyCallback(eta=4.0)
    trainer = _fit(tmp_path, [cb], steps=2)
    # step 1: q0 acc 1 -> 5 + 4*(0.5-1) = 3; q1 acc 0 -> 5 + 4*0.5 = 7; q2 acc 0.5 -> 5
    # step 2: q0 -> 3 - 2 = 1; q1 -> 7 + 2 = 9; q2 -> 5
    assert cb.table.as_dict() == pytest.approx({"q0": 1.0, "q1": 9.0, "q2": 5.0})
    # The module's attribute is the callback's very table (the contract for data pipelines).
    assert trainer.lightning_module.difficulty_table is cb.table
    rows = [r for r in _rows(trainer) if r.get("difficulty/mean")]
    assert [float(r["difficulty/mean"]) for r in rows] == pytest.approx([5.0, 5.0])  # (3+7+5)/3, (1+9+5)/3
    assert float(rows[-1]["difficulty/hist_1"]) == pytest.approx(1 / 3)  # q0 in [1, 2)
    assert float(rows[-1]["difficulty/hist_8"]) == pytest.approx(1 / 3)  # q1 = 9 falls in the last bin [8, 9]


def test_warmup_and_epoch_cadence(tmp_path: Path) -> None:
    warm = DifficultyCallback(warmup_steps=1)
    _fit(tmp_path / "a", [warm], steps=2)
    # the first step is warm-up (no update); only step 2 applies: q0 = 3, q1 = 7, q2 = 5
    assert warm.table.as_dict() == pytest.approx({"q0": 3.0, "q1": 7.0, "q2": 5.0})
    epoch = DifficultyCallback(update="epoch")
    _fit(tmp_path / "b", [epoch], steps=2)
    # epoch cadence: both steps accumulate (q0: 4/4 right), one update at epoch end: 5 - 2 = 3
    assert epoch.table.as_dict() == pytest.approx({"q0": 3.0, "q1": 7.0, "q2": 5.0})


def test_difficulty_table_survives_checkpoint(tmp_path: Path) -> None:
    cb = DifficultyCallback()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    _fit(tmp_path, [cb, saver], steps=2, max_steps=1)  # a mid-epoch checkpoint after step 1 of 2
    (ckpt,) = (tmp_path / "ckpt").glob("*step=1.ckpt")
    fresh = DifficultyCallback()
    _fit(tmp_path / "resumed", [fresh], steps=2, ckpt_path=str(ckpt), max_steps=2)
    # resumed after step 1 (q0 = 3, q1 = 7) and ran step 2: same as two uninterrupted steps
    assert fresh.table.as_dict() == pytest.approx({"q0": 1.0, "q1": 9.0, "q2": 5.0})


def test_advantage_monitor_metrics_in_csv(tmp_path: Path) -> None:
    trainer = _fit(tmp_path, [AdvantageMonitor()], steps=1)
    row = [r for r in _rows(trainer) if r.get("reward")][0]
    # rewards per question (0.9*acc + 0.1): q0 (1, 1), q1 (0.1, 0.1), q2 (1, 0.1)
    assert float(row["reward"]) == pytest.approx((1 + 1 + 0.1 + 0.1 + 1 + 0.1) / 6)
    assert float(row["frac_reward_zero_std"]) == pytest.approx(2 / 3)  # q0 and q1 groups have no spread
    assert float(row["tier/medium/count"]) == 6
    assert float(row["tier/medium/accuracy"]) == pytest.approx(3 / 6)
    assert float(row["timing/rollout_s"]) == pytest.approx(0.5)


def test_callbacks_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rule must be"):
        DifficultyCallback(rule="cubic")
    with pytest.raises(ValueError, match="update must be"):
        DifficultyCallback(update="never")
    with pytest.raises(ValueError, match="log_every_n_steps"):
        AdvantageMonitor(log_every_n_steps=0)


@pytest.mark.slow
def test_ddp_ranks_hold_identical_tables(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "tests/helpers/ddp_difficulty.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(r0) == len(r1) == 3
    for a, b in zip(r0, r1):
        assert a == b  # identical after every update
    # rank 0 saw only q0, q2; rank 1 saw q1, q3, q2: every rank still knows all four.
    # merged per step: q0 2/2 right (-2), q1 0/2 (+2), q2 2/4 (0), q3 2/2 (-2)
    assert r0[0] == pytest.approx({"q0": 3.0, "q1": 7.0, "q2": 5.0, "q3": 3.0})
    assert r0[-1] == pytest.approx({"q0": 1.0, "q1": 9.0, "q2": 5.0, "q3": 1.0})
    # the monitor ran on both ranks without deadlock: shared metrics are synchronised, and rank 0, which never saw
    # a hint prompt, logged its own per-kind rate only
    names = torch.load(tmp_path / "metrics0.pt")
    assert "frac_reward_zero_std" in names and "frac_reward_zero_std/original" in names
    assert "frac_reward_zero_std/hint" not in names


def test_monitor_splits_zero_spread_by_kind_and_tier() -> None:
    # Four local groups of 2 responses: an original and a hint variant of family 0 (hard tier),
    # an original and an image variant of family 1 (easy tier).
    out = {
        "rewards": torch.tensor([1.0, 1.0, 0.1, 1.0, 0.1, 0.1, 0.1, 0.1]),
        "prompt_ids": torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
        "family_ids": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
        "is_original": torch.tensor([True, True, False, False, True, True, False, False]),
        "kind": torch.tensor([0, 0, 3, 3, 0, 0, 2, 2]),
        "tier": torch.tensor([2, 2, 2, 2, 0, 0, 0, 0]),
        "accuracy": torch.tensor([1.0, 1, 0, 1, 0, 0, 0, 0]),
    }
    m = monitor_metrics(out)
    assert m["frac_reward_zero_std"] == pytest.approx(3 / 4)  # only the hint group (0.1, 1) has spread
    assert m["frac_family_zero_std"] == pytest.approx(1 / 2)  # family 1 is all 0.1
    assert m["frac_reward_zero_std/original"] == pytest.approx(1.0)
    assert m["frac_reward_zero_std/hint"] == pytest.approx(0.0)
    assert m["frac_reward_zero_std/image"] == pytest.approx(1.0)
    assert "frac_reward_zero_std/paraphrase" not in m  # no paraphrase prompt this step
    assert m["tier/hard/frac_zero_std"] == pytest.approx(1 / 2)
    assert m["tier/easy/frac_zero_std"] == pytest.approx(1.0)
    assert m["variant_rescue_rate"] == pytest.approx(1 / 2)  # family 0 rescued by its hint, family 1 not
    assert m["kind/original/accuracy"] == pytest.approx(2 / 4)
    assert m["kind/original/frac_all_correct"] == pytest.approx(1 / 2)  # family 0's original (1, 1)
    assert m["kind/hint/frac_all_correct"] == 0.0 and m["kind/image/accuracy"] == 0.0
    # which names may be missing on some rank (logged from rank 0 only under DDP)
    assert {k for k in m if rank_dependent(k)} == {k for k in m if k.startswith(("kind/", "frac_reward_zero_std/"))} | {
        "variant_rescue_rate", "tier/hard/frac_zero_std", "tier/easy/frac_zero_std", "tier/hard/accuracy",
        "tier/easy/accuracy"}
