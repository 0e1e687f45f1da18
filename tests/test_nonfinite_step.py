"""A non-finite gradient norm skips the optimizer step (the authors' dp_actor.py:163), counted in the logs, while the
step still counts; real module, real tiny policy, real Trainer through the CLI."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from diva_lightning.cli import run_cli
from tests.test_module import small_args


class NanGradientOnFirstStep(pl.Callback):
    """Turns every gradient of the first training step into NaN (a tensor hook on each trainable parameter) and
    keeps the trainable weights and AdamW's state around each step."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.before: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []
        self.optimizer_states: list[int] = []
        self.syncs: list[int] = []  # weight pushes to an engine with its own copy during each step

    @staticmethod
    def _weights(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.before.append(self._weights(pl_module))
        self.syncs.append(getattr(pl_module.engine, "syncs", 0))
        if batch_idx == 0:
            self.handles = [p.register_hook(lambda g: torch.full_like(g, float("nan")))
                            for p in pl_module.parameters() if p.requires_grad]

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.after.append(self._weights(pl_module))
        self.optimizer_states.append(len(trainer.optimizers[0].state))
        self.syncs[-1] = getattr(pl_module.engine, "syncs", 0) - self.syncs[-1]


def test_a_nan_gradient_skips_the_step_and_is_counted(tiny_policy_dir: str, tmp_path: Path) -> None:
    args = small_args(tiny_policy_dir, tmp_path, steps=2)
    args.append("--trainer.callbacks+=tests.test_nonfinite_step.NanGradientOnFirstStep")
    cli = run_cli(args)
    (probe,) = [c for c in cli.trainer.callbacks if isinstance(c, NanGradientOnFirstStep)]
    assert cli.trainer.global_step == 2  # the skipped step still counts
    first_before, first_after = probe.before[0], probe.after[0]
    assert all(torch.equal(first_before[n], first_after[n]) for n in first_before)  # nothing moved
    assert probe.optimizer_states[0] == 0  # AdamW took no step on any parameter
    second_before, second_after = probe.before[1], probe.after[1]
    assert any(not torch.equal(second_before[n], second_after[n]) for n in second_before)
    assert probe.optimizer_states[1] > 0
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("skipped_steps")]
    assert [float(r["skipped_steps"]) for r in rows] == [1.0, 0.0]
    assert rows[0]["grad_norm"] == "nan" and float(rows[1]["grad_norm"]) > 0


def test_a_skipped_step_pushes_no_weights(tiny_policy_dir: str, tmp_path: Path) -> None:
    """An engine with its own copy of the weights (vLLM's case; tests/helpers/engines.CopyEngine) is synced after a
    step that changed the weights, not after a skipped one (that would be a full weight push for nothing)."""
    args = small_args(tiny_policy_dir, tmp_path, steps=2) + [
        "--model.init_args.rollout", "tests.helpers.engines.CopyEngine",
        "--trainer.callbacks+=tests.test_nonfinite_step.NanGradientOnFirstStep"]
    cli = run_cli(args)
    (probe,) = [c for c in cli.trainer.callbacks if isinstance(c, NanGradientOnFirstStep)]
    assert probe.optimizer_states[0] == 0 and probe.syncs[0] == 0  # skipped: no push
    assert probe.syncs[1] >= 1  # taken: pushed
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("skipped_steps")]
    assert [float(r["skipped_steps"]) for r in rows] == [1.0, 0.0] and float(rows[1]["grad_norm"]) > 0
