"""What a training batch handed the callbacks, the same way for every callback (Lightning's semantics).

Lightning passes `on_train_batch_end` the dict returned by `training_step` (a returned tensor arrives wrapped as
`{"loss": tensor}`; a returned `None`, Lightning's way to skip a batch, arrives as `{}` or `None`). So:

- a dict with keys besides `loss`: those keys are the batch's outputs;
- `{"loss": tensor}` alone (`training_step` returned a tensor): the outputs are `pl_module.difficulty_outputs`, a dict
  the module sets in every such `training_step` (the fallback for code that must return the loss tensor);
- `None` or `{}` (`training_step` returned `None`): a skipped batch, no statistics, whatever the module's attributes
  say.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

FALLBACK_ATTR = "difficulty_outputs"


def batch_outputs(outputs: Any, pl_module: pl.LightningModule, who: str) -> Mapping[str, Any] | None:
    """The callback keys of one training batch, or None for a skipped batch (see the module docstring). `who` names
    the callback in the error raised when a returned tensor comes without `pl_module.difficulty_outputs`."""
    if outputs is None or (isinstance(outputs, Mapping) and not outputs):
        return None  # training_step returned None: Lightning skipped the batch
    if isinstance(outputs, Mapping) and set(outputs) - {"loss"}:
        return outputs
    fallback = getattr(pl_module, FALLBACK_ATTR, None)
    if isinstance(fallback, Mapping):
        return fallback
    raise KeyError(f"{who}: training_step returned only a loss and {type(pl_module).__name__}.{FALLBACK_ATTR} is "
                   f"{'missing' if fallback is None else type(fallback).__name__}; return a dict with the callback "
                   f"keys, or set {FALLBACK_ATTR} to one in every training_step (README, 'Callbacks in your own "
                   "Lightning project')")
