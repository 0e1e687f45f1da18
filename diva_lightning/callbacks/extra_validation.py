"""`ExtraValidation`: what `ValidateBeforeTraining` and `ValidateAfterTraining` share, one validation pass run from a
fit hook outside Lightning's own schedule.

It does what Lightning's training epoch loop does at a validation check: mark the stage validating (so `self.log`
reaches the fit loop's validation results), run the fit loop's validation loop, return to training. Its validation
also logs the subclass's `marker` metric = 1, so a reader of the metrics can tell it from the scheduled ones. Where
the public API falls short: `Trainer.fit_loop.epoch_loop.val_loop` is a loop attribute, not a documented entry point;
it is the object Lightning's own training loop calls.
"""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class ExtraValidation(Callback):
    """Base of the callbacks that validate once outside the schedule; subclasses call `validate` from a fit hook.

    Args:
        enabled: switch it off without removing it from a config.
    """

    marker: ClassVar[str]  # the metric logged (= 1) by this callback's validation

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.ran = False  # whether this instance ran its validation (tests, logs)
        self._running = False

    def validate(self, trainer: pl.Trainer) -> None:
        """Run the fit loop's validation loop once, as a scheduled validation check does, then return to training."""
        trainer.validating = True
        self._running = True
        try:
            trainer.fit_loop.epoch_loop.val_loop.run()
        finally:
            self._running = False
            trainer.training = True
        self.ran = True

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._running:
            pl_module.log(self.marker, 1.0, rank_zero_only=True)
