"""Pure tensor math of DIVA-GRPO: difficulty, variant tiers, advantages, policy loss (torch only)."""

from diva_lightning.core._checks import contiguous_ids
from diva_lightning.core.advantage import (
    AdvantageTerms,
    batch_zscore,
    difficulty_weight,
    diva_advantage_terms,
    diva_advantages,
    group_zscore,
    grpo_advantages,
    range_scale,
    threshold_scale,
)
from diva_lightning.core.difficulty import DifficultyStats, DifficultyTable, update_difficulty
from diva_lightning.core.loss import PolicyLossStats, aggregate, policy_loss
from diva_lightning.core.tiers import (
    IMAGE_OPS,
    TIERS,
    VariantSpec,
    hint_steps_for,
    plan_variants,
    tier_codes,
    tier_of,
    tiers_of,
)

__all__ = [
    "IMAGE_OPS",
    "TIERS",
    "AdvantageTerms",
    "DifficultyStats",
    "DifficultyTable",
    "PolicyLossStats",
    "VariantSpec",
    "aggregate",
    "batch_zscore",
    "contiguous_ids",
    "difficulty_weight",
    "diva_advantage_terms",
    "diva_advantages",
    "group_zscore",
    "grpo_advantages",
    "hint_steps_for",
    "plan_variants",
    "policy_loss",
    "range_scale",
    "threshold_scale",
    "tier_codes",
    "tier_of",
    "tiers_of",
    "update_difficulty",
]
