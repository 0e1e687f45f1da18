"""Reusable Lightning callbacks (usable outside diva-lightning; each module documents its contract)."""

from diva_lightning.callbacks.advantage_monitor import AdvantageMonitor, monitor_metrics
from diva_lightning.callbacks.difficulty import DifficultyCallback
from diva_lightning.callbacks.timing import ElapsedTime
from diva_lightning.callbacks.validate_first import ValidateBeforeTraining
from diva_lightning.callbacks.validate_last import ValidateAfterTraining

__all__ = ["AdvantageMonitor", "DifficultyCallback", "ElapsedTime", "ValidateAfterTraining", "ValidateBeforeTraining",
           "monitor_metrics"]
