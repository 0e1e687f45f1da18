"""Group statistics that the monitors log (design.md section 7). Pure torch.

All inputs are 1-D, one entry per response (length N). Group ids are integer tensors; they need not be
contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "group_has_spread", "zero_std_fraction", "variant_rescue_rate", "per_group_mean", "zero_spread_probability",
]


def _dense(ids: Tensor) -> tuple[Tensor, int]:
    """Map arbitrary integer ids [N] to 0..K-1 (sorted order); returns (dense ids [N], K)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_has_spread(values: Tensor, group_ids: Tensor, *, tol: float = 0.0) -> Tensor:
    """Whether each group's values differ (max - min > tol). Returns bool [K], groups in sorted id order."""
    if values.shape != group_ids.shape or values.dim() != 1:
        raise ValueError(f"values {tuple(values.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    dense, k = _dense(group_ids)
    v = values.to(torch.float64)
    hi = torch.full((k,), -torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, dense, v, "amax")
    lo = torch.full((k,), torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, dense, v, "amin")
    return (hi - lo) > tol


def zero_std_fraction(values: Tensor, group_ids: Tensor) -> float:
    """Fraction of groups whose values are all equal: the advantage-vanishing rate (TRL's frac_reward_zero_std)."""
    if values.numel() == 0:
        return 0.0
    spread = group_has_spread(values, group_ids)
    return float((~spread).to(torch.float64).mean())


def per_group_mean(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Mean of values per group. Returns (sorted unique ids [K], means [K] float64)."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64, device=values.device)
    sums.index_add_(0, inverse, values.to(torch.float64))
    counts = torch.bincount(inverse, minlength=uniq.numel()).to(torch.float64)
    return uniq, sums / counts


def variant_rescue_rate(
    values: Tensor, prompt_ids: Tensor, question_ids: Tensor, is_original: Tensor
) -> float | None:
    """Among families whose *original* prompt group has zero spread, the fraction whose whole family has spread.

    This is how often the variants restored a learning signal that plain GRPO would have lost.

    Args:
        values: rewards [N].
        prompt_ids: local group of each response [N].
        question_ids: family of each response [N].
        is_original: bool [N], True for responses to the unmodified question.

    Returns:
        The rate in [0, 1], or None when no family had a zero-spread original group (nothing to rescue).
    """
    if not (values.shape == prompt_ids.shape == question_ids.shape == is_original.shape):
        raise ValueError("values, prompt_ids, question_ids and is_original must have the same shape")
    orig = is_original.bool()
    if not bool(orig.any()):
        return None
    # Original groups with zero spread, identified by their question id.
    o_q = question_ids[orig]
    o_spread = group_has_spread(values[orig], o_q)
    o_uniq = torch.unique(o_q)
    stuck_q = o_uniq[~o_spread]
    if stuck_q.numel() == 0:
        return None
    fam_uniq = torch.unique(question_ids)
    fam_spread = group_has_spread(values, question_ids)
    rescued = fam_spread[torch.searchsorted(fam_uniq, stuck_q)]
    return float(rescued.to(torch.float64).mean())


def zero_spread_probability(p: Tensor | float, n: int) -> Tensor:
    """Probability that a group of ``n`` independent 0/1 rewards with success rate ``p`` has zero spread.

    ``P0(p, n) = p**n + (1 - p)**n``: all correct or all wrong. It is the expected ``frac_reward_zero_std`` of a
    group of ``n`` responses to a prompt the policy answers right with probability ``p``. It falls with ``n`` for
    every ``p`` strictly inside (0, 1) and is smallest at ``p = 0.5``, where it is ``2 ** (1 - n)``. So at an
    equal rollout budget, a DIVA local group (``G`` responses) has a higher floor than a GRPO group of
    ``(V + 1) * G`` responses to the same question, and DIVA's variants can only win where the original's ``p`` is
    near 0 or 1 (docs/zero_spread.md works the crossover out).

    Args:
        p: success probabilities in [0, 1], any shape.
        n: responses per group, >= 1.

    Returns:
        float64 tensor of p's shape.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pt = torch.as_tensor(p, dtype=torch.float64)
    if bool(((pt < 0) | (pt > 1) | torch.isnan(pt)).any()):
        raise ValueError("p must lie in [0, 1]")
    return pt**n + (1 - pt) ** n
