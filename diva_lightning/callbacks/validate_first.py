"""`ValidateBeforeTraining`: one full validation pass before the first training step, logged at step 0.

The authors validate the base policy before training (EasyR1's `val_before_train: true`), so every curve starts
from the base policy's score. Lightning has no such switch, and what looks like one does not do it:

- `num_sanity_val_steps: -1` runs the whole validation set before training, but as a *sanity check*: Lightning
  logs nothing from it and resets its metrics afterwards.
- `trainer.validate(...)` before `trainer.fit(...)` logs, but it is a separate run: the strategy is torn down in
  between (the model moves to the CPU and back; under FSDP2 the sharded model makes that round trip too), and the
  data module and the system are set up twice.

So this callback runs the fit loop's own validation loop once from `on_train_start`, the same loop (and the same
two state changes around it) that Lightning runs at each `val_check_interval`: it logs through the system's usual
`self.log` calls, at step 0, on every strategy, and it is skipped when a run resumes (global step > 0) so a
resumed run never re-validates. Its validation also logs `val/before_training` = 1, so a reader of the metrics can tell
the base policy's score (step 0) from the validation after the first step, which Lightning also logs at step 0
when `val_check_interval` is 1 (`sweeps/runlog.val_curve` leaves it out of the training curve). The validation
pass itself is `ExtraValidation.validate` (shared with `ValidateAfterTraining`).
"""

from __future__ import annotations

import lightning.pytorch as pl
from typing_extensions import override

from diva_lightning.callbacks.extra_validation import ExtraValidation


class ValidateBeforeTraining(ExtraValidation):
    """Validate once before the first training step (logged at step 0); never on a resumed run.

    Args:
        enabled: switch it off without removing it from a config (e.g. for a quick smoke run).
    """

    marker = "val/before_training"

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.global_step > 0 or not trainer.enable_validation:
            return
        self.validate(trainer)
