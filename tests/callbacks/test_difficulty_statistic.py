"""DifficultyCallback(statistic=...): the paper's accuracy or the authors' combined reward, with a real Trainer."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from diva_lightning.callbacks import DifficultyCallback
from diva_lightning.callbacks.difficulty import stats_from_outputs
from diva_lightning.core.difficulty import DIFFICULTY_STATISTICS
from tests.helpers.foreign import ForeignModule, loader


def _fit_one_step(tmp_path: Path, cb: DifficultyCallback) -> None:
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, callbacks=[cb], enable_progress_bar=False,
                         enable_checkpointing=False, default_root_dir=tmp_path, enable_model_summary=False)
    trainer.fit(ForeignModule(), train_dataloaders=loader(["q0", "q1", "q2"], 1))


@pytest.mark.parametrize(
    ("statistic", "expected"),
    [
        # ForeignModule answers twice: q0 right twice, q1 wrong twice (well formatted), q2 once right;
        # reward = 0.9 acc + 0.1. Binned steps: [0, .05] +2, (.05, .3] +1, (.3, .5] 0, (.5, .7] -1, (.7, 1] -2.
        # accuracy: q0 1 -> -2 = 3; q1 0 -> +2 = 7; q2 0.5 -> 0 = 5
        ("accuracy", {"q0": 3.0, "q1": 7.0, "q2": 5.0}),
        # reward: q0 1.0 -> -2 = 3; q1 0.1 -> +1 = 6 (not +2: official-diva.md); q2 (1 + 0.1) / 2 = 0.55 -> -1 = 4
        ("reward", {"q0": 3.0, "q1": 6.0, "q2": 4.0}),
    ],
)
def test_binned_rule_with_each_statistic(tmp_path: Path, statistic: str, expected: dict[str, float]) -> None:
    cb = DifficultyCallback(rule="binned", statistic=statistic)
    _fit_one_step(tmp_path, cb)
    assert cb.table.as_dict() == pytest.approx(expected)


def test_stats_from_outputs_reads_the_statistic_key() -> None:
    assert DIFFICULTY_STATISTICS == ("accuracy", "reward")
    out = {"question_ids": ["a", "a", "b"], "accuracy": torch.tensor([0.0, 0.0, 1.0]),
           "rewards": torch.tensor([0.1, 0.1, 1.0])}  # fmt: skip
    acc = stats_from_outputs(out, "accuracy")
    rew = stats_from_outputs(out, "reward")
    assert acc is not None and rew is not None
    # correct sums per question: accuracy a = 0, b = 1; reward a = 0.1 + 0.1 = 0.2, b = 1; counts 2 and 1
    assert dict(zip(acc.ids, acc.correct.tolist())) == pytest.approx({"a": 0.0, "b": 1.0})
    assert dict(zip(rew.ids, rew.correct.tolist())) == pytest.approx({"a": 0.2, "b": 1.0})
    assert rew.count.tolist() == acc.count.tolist()
    # reward statistic without rewards: nothing to read (the callback then raises KeyError)
    assert stats_from_outputs({"question_ids": ["a"], "accuracy": torch.ones(1)}, "reward") is None
    with pytest.raises(ValueError, match=r"in \[0, 1\].*responses \[1\]"):
        stats_from_outputs({"question_ids": ["a", "a"], "rewards": torch.tensor([0.5, 1.5])}, "reward")
    with pytest.raises(ValueError, match="statistic"):
        stats_from_outputs(out, "format")


def test_bad_statistic_rejected_at_construction() -> None:
    with pytest.raises(ValueError, match="statistic must be one of"):
        DifficultyCallback(statistic="format")
