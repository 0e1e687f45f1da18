"""Advantage estimators as injectable components (chosen by `class_path` in a config, never by string ifs).

Each is a thin, typed wrapper around a pure function of `diva_lightning.core.advantage`, so the configuration
is what the CLI prints and the math stays testable on its own. An estimator is called with per-response
tensors of length N and returns advantages [N].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from diva_lightning.core.advantage import DivaSettings, diva_advantages, grpo_advantages
from diva_lightning.core.choices import GrpoScale, choice_problems


class AdvantageEstimator(ABC):
    """rewards, prompt_ids (local groups), family_ids (global groups), difficulty labels, all [N] -> [N].

    A base class rather than a Protocol: jsonargparse resolves `class_path` against it, so a user's own
    estimator is one subclass and one config line away.
    """

    uses_variants: bool = False

    @abstractmethod
    def __call__(self, rewards: Tensor, prompt_ids: Tensor, family_ids: Tensor, difficulty: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class DivaAdvantage(DivaSettings, AdvantageEstimator):
    """DIVA's estimator (design.md section 5): its init arguments are the fields of
    :class:`diva_lightning.core.advantage.DivaSettings` (declared there once, documented there; checked when
    built, every problem listed). Each Table 2 ablation is one argument:

    - w/o difficulty weighting: `difficulty_weighting=False` (equivalently k=0);
    - w/o RRB: `rrb=None`;
    - w/o G-L balance: `batch_norm=False`.
    """

    uses_variants = True

    def __call__(self, rewards: Tensor, prompt_ids: Tensor, family_ids: Tensor, difficulty: Tensor) -> Tensor:
        return diva_advantages(rewards, prompt_ids, family_ids, difficulty, self)


@dataclass(frozen=True)
class GRPOAdvantage(AdvantageEstimator):
    """Vanilla GRPO: local (per-prompt) advantage only.

    Args:
        scale: "group" (divide by the prompt group's std, as in GRPO/TRL), "batch" (by the batch std) or
            "none" (Dr.GRPO: mean-centred only).
        eps: added to standard deviations.
    """

    scale: GrpoScale = "group"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        problems = choice_problems("scale", self.scale, GrpoScale)
        if problems:
            raise ValueError("GRPOAdvantage: " + problems[0])

    def __call__(self, rewards: Tensor, prompt_ids: Tensor, family_ids: Tensor, difficulty: Tensor) -> Tensor:
        return grpo_advantages(rewards, prompt_ids, scale=self.scale, eps=self.eps)
