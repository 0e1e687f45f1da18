"""Reusable Lightning callbacks (usable outside diva-lightning; each module documents its contract)."""

from diva_lightning.callbacks.advantage_monitor import AdvantageMonitor, monitor_metrics
from diva_lightning.callbacks.difficulty import DifficultyCallback
from diva_lightning.callbacks.timing import ElapsedTime

__all__ = ["AdvantageMonitor", "DifficultyCallback", "ElapsedTime", "monitor_metrics"]
