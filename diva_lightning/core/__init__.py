"""Pure tensor math of DIVA-GRPO: difficulty, variant tiers, advantages, policy loss (torch only)."""

from diva_lightning.core._checks import contiguous_ids
from diva_lightning.core.advantage import (
    AdvantageTerms,
    DivaSettings,
    batch_zscore,
    difficulty_weight,
    diva_advantage_terms,
    diva_advantages,
    group_zscore,
    grpo_advantages,
    range_scale,
    threshold_scale,
)
from diva_lightning.core.correction import IS_LEVELS, IS_MODES, CorrectionStats, importance_weights
from diva_lightning.core.difficulty import (
    DIFFICULTY_STATISTICS,
    DifficultyStats,
    DifficultyTable,
    update_difficulty,
)
from diva_lightning.core.filtering import Selection, SpreadFilter, select_units, spread_filter
from diva_lightning.core.loss import RATIO_LEVELS, PolicyLossStats, aggregate, policy_loss, truncation_mask
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
    "DIFFICULTY_STATISTICS",
    "IMAGE_OPS",
    "IS_LEVELS",
    "IS_MODES",
    "RATIO_LEVELS",
    "TIERS",
    "AdvantageTerms",
    "CorrectionStats",
    "DivaSettings",
    "DifficultyStats",
    "DifficultyTable",
    "PolicyLossStats",
    "Selection",
    "SpreadFilter",
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
    "importance_weights",
    "plan_variants",
    "policy_loss",
    "range_scale",
    "select_units",
    "spread_filter",
    "threshold_scale",
    "tier_codes",
    "tier_of",
    "tiers_of",
    "truncation_mask",
    "update_difficulty",
]
