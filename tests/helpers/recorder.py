"""A callback that keeps each step's outputs and the difficulty table right after its update (for tests)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from diva_lightning.callbacks import DifficultyCallback


class Recorder(pl.Callback):
    """Keeps each step's outputs and the difficulty table right after the update."""

    def __init__(self) -> None:
        self.outputs: list[dict[str, Any]] = []
        self.tables: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.outputs.append({k: v for k, v in outputs.items() if k != "timings"})
        # (a bare next() here raised StopIteration in runs without the callback, which Lightning's loop takes
        # for the end of the data: the run then logged nothing)
        diff = next((c for c in trainer.callbacks if isinstance(c, DifficultyCallback)), None)
        if diff is not None:
            self.tables.append(diff.table.as_dict())
