"""Advantage estimators as injectable components (chosen by `class_path` in a config, never by string ifs).

Each is a thin, typed wrapper around a pure function of `diva_lightning.core.advantage`, so the configuration
is what the CLI prints and the math stays testable on its own. An estimator is called with per-response
tensors of length N and returns advantages [N].
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from diva_lightning.core.advantage import GRPO_SCALES, RRB_MODES, WEIGHT_TERMS, diva_advantages, grpo_advantages


class AdvantageEstimator(ABC):
    """rewards, prompt_ids (local groups), family_ids (global groups), difficulty labels, all [N] -> [N].

    A base class rather than a Protocol: jsonargparse resolves `class_path` against it, so a user's own
    estimator is one subclass and one config line away.
    """

    uses_variants: bool = False

    @abstractmethod
    def __call__(self, rewards: Tensor, prompt_ids: Tensor, family_ids: Tensor, difficulty: Tensor) -> Tensor: ...


class DivaAdvantage(AdvantageEstimator):
    """DIVA's estimator (design.md section 5). Each Table 2 ablation is one argument:

    - w/o difficulty weighting: `difficulty_weighting=False` (equivalently k=0);
    - w/o RRB: `rrb=None`;
    - w/o G-L balance: `batch_norm=False`.

    Args:
        k: difficulty-weighting strength (official 0.1).
        local_weight / global_weight: merge weights of the local and global terms.
        batch_norm: z-score each term over the batch before merging (local-global balance).
        difficulty_weighting: apply exp(k (D_i - Dbar_q) sign(A)).
        weight_terms: "global" (official) or "both".
        rrb: "range" (paper), "threshold" (official) or None.
        r_max: reward range used by rrb="range".
        rrb_threshold / rrb_factor: rrb="threshold" (official `ZSCORENORM_WAN_RRBLOCAL_RRBGLOBAL`): a group
            whose rewards are all below `rrb_threshold` has its advantages multiplied by `rrb_factor`
            (official 0.15 and 0.1, applied to local and global groups separately).
        eps: added to standard deviations.
    """

    uses_variants = True

    def __init__(
        self,
        k: float = 0.1,
        local_weight: float = 1.0,
        global_weight: float = 1.0,
        batch_norm: bool = True,
        difficulty_weighting: bool = True,
        weight_terms: str = "global",
        rrb: str | None = "range",
        r_max: float = 1.0,
        eps: float = 1e-6,
        rrb_threshold: float = 0.15,
        rrb_factor: float = 0.1,
    ) -> None:
        problems = []
        if weight_terms not in WEIGHT_TERMS:
            problems.append(f"weight_terms must be one of {list(WEIGHT_TERMS)}, got {weight_terms!r}")
        if rrb not in RRB_MODES:
            problems.append(f"rrb must be one of {list(RRB_MODES)}, got {rrb!r}")
        if r_max <= 0:
            problems.append(f"r_max must be > 0, got {r_max}")
        if rrb_factor < 0:
            problems.append(f"rrb_factor must be >= 0, got {rrb_factor}")
        if problems:
            raise ValueError("DivaAdvantage: " + "; ".join(problems))
        self.k, self.local_weight, self.global_weight = k, local_weight, global_weight
        self.batch_norm, self.difficulty_weighting, self.weight_terms = batch_norm, difficulty_weighting, weight_terms
        self.rrb, self.r_max, self.eps = rrb, r_max, eps
        self.rrb_threshold, self.rrb_factor = rrb_threshold, rrb_factor

    def __call__(self, rewards: Tensor, prompt_ids: Tensor, family_ids: Tensor, difficulty: Tensor) -> Tensor:
        return diva_advantages(
            rewards, prompt_ids, family_ids, difficulty, k=self.k, local_weight=self.local_weight,
            global_weight=self.global_weight, batch_norm=self.batch_norm,
            difficulty_weighting=self.difficulty_weighting, weight_terms=self.weight_terms, rrb=self.rrb,
            r_max=self.r_max, rrb_threshold=self.rrb_threshold, rrb_factor=self.rrb_factor, eps=self.eps,
        )

    def __repr__(self) -> str:
        return (f"DivaAdvantage(k={self.k}, local_weight={self.local_weight}, global_weight={self.global_weight}, "
                f"batch_norm={self.batch_norm}, difficulty_weighting={self.difficulty_weighting}, "
                f"weight_terms={self.weight_terms!r}, rrb={self.rrb!r}, rrb_threshold={self.rrb_threshold}, "
                f"rrb_factor={self.rrb_factor})")


class GRPOAdvantage(AdvantageEstimator):
    """Vanilla GRPO: local (per-prompt) advantage only.

    Args:
        scale: "group" (divide by the prompt group's std, as in GRPO/TRL), "batch" (by the batch std) or
            "none" (Dr.GRPO: mean-centred only).
        eps: added to standard deviations.
    """

    uses_variants = False

    def __init__(self, scale: str = "group", eps: float = 1e-6) -> None:
        if scale not in GRPO_SCALES:
            raise ValueError(f"GRPOAdvantage: scale must be one of {list(GRPO_SCALES)}, got {scale!r}")
        self.scale, self.eps = scale, eps

    def __call__(self, rewards: Tensor, prompt_ids: Tensor, family_ids: Tensor, difficulty: Tensor) -> Tensor:
        return grpo_advantages(rewards, prompt_ids, scale=self.scale, eps=self.eps)

    def __repr__(self) -> str:
        return f"GRPOAdvantage(scale={self.scale!r})"
