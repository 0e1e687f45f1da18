"""`ValidateAfterTraining`: one more validation pass after the last training step, unless that step just validated.

The authors validate once more when training ends, unless the last step just validated
(``verl/trainer/ray_trainer.py:1027-1035`` in Siaaaaaa1/DIVA_GRPO_release). Lightning validates only every
`val_check_interval` training batches (with `check_val_every_n_epoch: null`), so a run whose last step is not a
multiple of it ends without scoring its final policy. This callback runs the fit loop's own validation loop from
`on_train_end` (`ExtraValidation.validate`, shared with `ValidateBeforeTraining`, which runs it from `on_train_start`),
so it logs through the system's usual `self.log` calls at the final step. Its validation also logs
`val/after_training` = 1. It is skipped when the last step already validated, when validation is off
(`limit_val_batches: 0`) and when no step was taken.
"""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override

from diva_lightning.callbacks.extra_validation import ExtraValidation


class ValidateAfterTraining(ExtraValidation):
    """Validate once after the last training step (see the module docs).

    Args:
        enabled: switch it off without removing it from a config.
    """

    marker = "val/after_training"

    def __init__(self, enabled: bool = True) -> None:
        super().__init__(enabled)
        self._validated_at: int | None = None

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validated_at = trainer.global_step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if not self.enabled or step == 0 or not trainer.enable_validation or self._validated_at == step:
            return
        self.validate(trainer)
