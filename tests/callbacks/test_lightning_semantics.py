"""The callbacks follow Lightning's semantics in a LightningModule that is not ours (the README's example,
examples/foreign_callbacks.py, run as written and subclassed), through a real Trainer:

- every batch counts whatever `accumulate_grad_batches` is (1, 2, 3): the difficulty table moves once per batch, and
  the monitor logs once per optimizer step the mean over that step's batches;
- warm-up is counted in optimizer steps (`warmup_steps * accumulate_grad_batches` batches);
- `None` from `training_step` is a skipped batch for both callbacks;
- both return styles: a dict, or the loss tensor with `pl_module.difficulty_outputs` set.

The example's model answers q0 always right, q1 always wrong, q2 half right; with eta=0.5 the linear rule moves q0
by -0.25 and q1 by +0.25 per batch, q2 (seeded at 8 by the data module) stays: after n counted batches
{q0: 5 - n/4, q1: 5 + n/4, q2: 8}.
"""

from __future__ import annotations

import ast
import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from diva_lightning.callbacks import AdvantageMonitor, DifficultyCallback

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "foreign_callbacks.py"
_spec = importlib.util.spec_from_file_location("foreign_callbacks", EXAMPLE)
assert _spec is not None and _spec.loader is not None
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)


def expected_table(batches: int) -> dict[str, float]:
    return {"q0": 5 - batches / 4, "q1": 5 + batches / 4, "q2": 8.0}


class Styled(example.Answerer):  # type: ignore[name-defined,misc]
    """The example's module with the other return style, skipped batches, and a reward that tells batches apart
    (batch b: every response gets b / 10)."""

    def __init__(self, style: str = "dict", skip: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.style, self.skip = style, skip

    def training_step(self, batch: list[str], batch_idx: int) -> Any:
        if batch_idx in self.skip:
            return None
        out = super().training_step(batch, batch_idx)
        out["rewards"] = torch.full_like(out["accuracy"], batch_idx / 10)
        if self.style == "tensor":
            self.difficulty_outputs = out
            return out["loss"]
        return out


def fit(tmp_path: Path, module: pl.LightningModule, accumulate: int, *, batches: int = 6, epochs: int = 1,
        warmup_steps: int = 0) -> tuple[DifficultyCallback, list[dict[str, str]]]:
    difficulty = DifficultyCallback(eta=0.5, warmup_steps=warmup_steps)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, accumulate_grad_batches=accumulate,
                         callbacks=[difficulty, AdvantageMonitor()], logger=CSVLogger(tmp_path), log_every_n_steps=1,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, datamodule=example.Questions(batches))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[union-attr]
        rows = list(csv.DictReader(f))
    return difficulty, rows


def step_means(batch_ids: list[int], accumulate: int, skip: tuple[int, ...] = ()) -> list[float]:
    """The monitor's expected `reward` per optimizer step: the mean of b / 10 over the step's unskipped batches."""
    steps = [batch_ids[i:i + accumulate] for i in range(0, len(batch_ids), accumulate)]
    return [sum(b / 10 for b in s if b not in skip) / len([b for b in s if b not in skip]) for s in steps]


@pytest.mark.parametrize("style", ["dict", "tensor"])
@pytest.mark.parametrize("accumulate", [1, 2, 3])
def test_every_batch_counts_under_accumulation(tmp_path: Path, accumulate: int, style: str) -> None:
    difficulty, rows = fit(tmp_path, Styled(style), accumulate)
    assert difficulty.table.as_dict() == pytest.approx(expected_table(6))  # 6 batches, 6 updates
    assert difficulty.num_updates == 6 and difficulty.skipped_batches == 0
    logged = [float(r["reward"]) for r in rows if r.get("reward")]
    assert logged == pytest.approx(step_means(list(range(6)), accumulate))  # one row per optimizer step


@pytest.mark.parametrize("style", ["dict", "tensor"])
def test_none_is_a_skipped_batch_for_both_callbacks(tmp_path: Path, style: str) -> None:
    skip = (1, 4)
    difficulty, rows = fit(tmp_path, Styled(style, skip=skip), accumulate=2)
    # the tensor style's difficulty_outputs still holds batch 0's dict when batch 1 is skipped: it is not read
    assert difficulty.table.as_dict() == pytest.approx(expected_table(4))
    assert (difficulty.num_updates, difficulty.skipped_batches) == (4, 2)
    logged = [float(r["reward"]) for r in rows if r.get("reward")]
    assert logged == pytest.approx(step_means(list(range(6)), 2, skip))  # [0.0, 0.25, 0.5]


def test_warmup_counts_optimizer_steps_and_epochs_keep_every_batch(tmp_path: Path) -> None:
    # warm-up of 1 optimizer step under accumulation 2: the first 2 batches are warm-up, the other 4 count
    difficulty, _ = fit(tmp_path / "warm", Styled(), accumulate=2, warmup_steps=1)
    assert difficulty.table.as_dict() == pytest.approx(expected_table(4)) and difficulty.num_updates == 4
    # 2 epochs of 3 batches under accumulation 2 (Lightning steps at each epoch's last batch): 6 batches, 6 updates
    difficulty, rows = fit(tmp_path / "epochs", Styled(), accumulate=2, batches=3, epochs=2)
    assert difficulty.table.as_dict() == pytest.approx(expected_table(6)) and difficulty.num_updates == 6
    assert [float(r["reward"]) for r in rows if r.get("reward")] == pytest.approx([0.05, 0.2, 0.05, 0.2])


def test_a_returned_tensor_without_the_attribute_is_a_clear_error(tmp_path: Path) -> None:
    class Bare(example.Answerer):  # type: ignore[name-defined,misc]
        def training_step(self, batch: list[str], batch_idx: int) -> Any:
            return super().training_step(batch, batch_idx)["loss"]

    with pytest.raises(KeyError, match="DifficultyCallback: training_step returned only a loss and "
                                       "Bare.difficulty_outputs is missing"):
        fit(tmp_path, Bare(), accumulate=1)


def test_readme_example_is_the_file_and_runs() -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"<!-- example: examples/foreign_callbacks.py -->\n```python\n(.*?)```", readme, re.S)
    assert blocks == [EXAMPLE.read_text()], "README's example differs from examples/foreign_callbacks.py"
    done = subprocess.run([sys.executable, str(EXAMPLE)], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert ast.literal_eval(done.stdout.strip().splitlines()[-1]) == pytest.approx(expected_table(6))
