"""Test helper callback: saves each step's advantage inputs and outputs to <log_dir>/trace.pt, so a test can
recompute the advantages under the resolved config and prove which components were really on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


class AdvantageTrace(pl.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        keys = ("rewards", "prompt_ids", "family_ids", "difficulty", "advantages")
        self.steps.append({k: outputs[k].detach().cpu() for k in keys})

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.save(self.steps, Path(trainer.log_dir or ".") / "trace.pt")
