"""Generation engines: HF ``generate`` (default) and vLLM (optional extra, imported lazily)."""

from diva_lightning.rollout.base import Rollout, RolloutEngine, mask_after_stop
from diva_lightning.rollout.hf import HFGenerateEngine

__all__ = ["HFGenerateEngine", "Rollout", "RolloutEngine", "mask_after_stop"]
