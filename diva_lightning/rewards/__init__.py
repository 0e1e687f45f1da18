"""Rewards: math-verify accuracy of the last boxed answer, the think/boxed format, batched combination.

Usable without Lightning; thread-safe (no signals). See :mod:`diva_lightning.rewards.registry` for the
contract of a user-supplied reward function.
"""

from diva_lightning.rewards.accuracy import accuracy_reward, choice_letter, last_boxed
from diva_lightning.rewards.format import format_reward
from diva_lightning.rewards.function import FunctionReward
from diva_lightning.rewards.registry import (
    CombinedReward,
    Reward,
    RewardBreakdown,
    RewardFunction,
    as_breakdown,
    load_reward_fn,
)

__all__ = [
    "CombinedReward",
    "FunctionReward",
    "Reward",
    "RewardBreakdown",
    "RewardFunction",
    "accuracy_reward",
    "as_breakdown",
    "choice_letter",
    "format_reward",
    "last_boxed",
    "load_reward_fn",
]
