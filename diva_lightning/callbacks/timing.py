"""`ElapsedTime`: wall-clock seconds since the start of `fit`, logged with the metrics.

Logger rows carry a step but no time, so "seconds to reach an accuracy" (the sweep's efficiency table) cannot be
read back from them. This callback adds two columns:

- `time/elapsed_s` on every training step (seconds from `on_fit_start` to the end of that step);
- `val/elapsed_s` on every validation row (seconds from `on_fit_start` to the end of that validation), so the
  validation accuracy and the time it was reached sit on the same CSV row.

Both include validation time: it is the wall-clock a user waits for. The clock is `time.perf_counter`, per
process; with several ranks each rank measures its own (rank 0's value is what loggers keep).
Usable in any Lightning project.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class ElapsedTime(Callback):
    """Logs `time/elapsed_s` after each training step and `val/elapsed_s` after each validation (see module doc)."""

    def __init__(self) -> None:
        self._start: float | None = None

    def elapsed(self) -> float:
        """Seconds since fit start (0.0 before `on_fit_start`)."""
        return 0.0 if self._start is None else time.perf_counter() - self._start

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pl_module.log("time/elapsed_s", self.elapsed(), on_step=True, on_epoch=False, rank_zero_only=True)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._start is None:  # sanity checks and plain `validate` have no fit clock
            return
        pl_module.log("val/elapsed_s", self.elapsed(), rank_zero_only=True)
