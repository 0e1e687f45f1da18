"""Advantage estimators: the DIVA estimator (design.md section 5) and vanilla GRPO.

Inputs are per response (N responses in the batch). Group ids are integer tensors: ``prompt_ids``
(local group = the G responses to one prompt) and ``question_ids`` (global group = all responses of a
question and its variants). Map arbitrary ids with :func:`diva_lightning.core.contiguous_ids`.

DIVA steps, in the spec's order (:func:`diva_advantage_terms`):

1. group z-score: ``A_loc`` over prompts, ``A_glob`` over families (``torch.std`` unbiased; a group of
   one response or with zero spread gives exactly 0);
2. ``batch_norm``: z-score each term over all N responses;
3. ``difficulty_weighting``: ``A <- exp(k (D_i - Dbar_q) sign(A)) A`` on the global term (or both);
4. RRB on the result of 2-3: ``"range"`` multiplies by ``(max - min) / r_max`` of the response's group
   (prompt group for ``A_loc``, family for ``A_glob``); ``"threshold"`` multiplies by ``rrb_factor``
   the groups whose rewards are all below ``rrb_threshold``; ``None`` is off. Applied last (after
   batch normalisation and weighting, as the spec orders them) so that the factor is exactly the
   group's reward range and not undone by a later normalisation;
5. merge ``A = local_weight * A_loc + global_weight * A_glob``.

Every group z-score sums to 0 within its group, so the batch mean in step 2 is 0 and batch
normalisation only rescales: responses of zero-spread groups keep advantage 0 (up to rounding).
All math runs in the rewards' dtype; outputs keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from diva_lightning.core._checks import (
    check_1d,
    check_finite,
    check_float,
    check_int_ids,
    check_same_length,
)
from diva_lightning.core.choices import GrpoScale, RrbMode, WeightTerms, check_choice, choice_problems


@dataclass(frozen=True)
class DivaSettings:
    """The DIVA estimator's settings, declared once: :func:`diva_advantages` takes them and
    ``training.estimators.DivaAdvantage`` is built from them (its init arguments are these fields).

    Attributes:
        k: difficulty-weighting strength (official 0.1).
        local_weight, global_weight: merge weights of the local and global terms (step 5).
        batch_norm: z-score each term over the batch before merging (step 2, the local-global balance).
        difficulty_weighting: apply ``exp(k (D_i - Dbar_q) sign(A))`` (step 3).
        weight_terms: "global" (official: the global term only) or "both".
        rrb: "range" (paper), "threshold" (official) or None (off) (step 4).
        r_max: the reward range of ``rrb="range"``.
        eps: added to standard deviations.
        rrb_threshold, rrb_factor: ``rrb="threshold"`` (official ``ZSCORENORM_WAN_RRBLOCAL_RRBGLOBAL``): a group
            whose rewards are all below ``rrb_threshold`` has its advantages multiplied by ``rrb_factor``
            (official 0.15 and 0.1, applied to local and global groups separately).

    Raises:
        ValueError: listing every problem (unknown ``weight_terms``/``rrb``, ``r_max <= 0``, ``rrb_factor < 0``).
    """

    k: float = 0.1
    local_weight: float = 1.0
    global_weight: float = 1.0
    batch_norm: bool = True
    difficulty_weighting: bool = True
    weight_terms: WeightTerms = "global"
    rrb: RrbMode | None = "range"
    r_max: float = 1.0
    eps: float = 1e-6
    rrb_threshold: float = 0.15
    rrb_factor: float = 0.1

    def __post_init__(self) -> None:
        problems = choice_problems("weight_terms", self.weight_terms, WeightTerms)
        problems += choice_problems("rrb", self.rrb, RrbMode, optional=True)
        if not self.r_max > 0:
            problems.append(f"r_max must be > 0, got {self.r_max}")
        if not self.rrb_factor >= 0:
            problems.append(f"rrb_factor must be >= 0, got {self.rrb_factor}")
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))


@dataclass(frozen=True)
class _Groups:
    """Dense group index of each response and the number of groups."""

    index: Tensor  # [N] int64 in [0, num)
    num: int


def _groups(group_ids: Tensor) -> _Groups:
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return _Groups(inverse, int(uniq.numel()))


def _group_sum(values: Tensor, g: _Groups) -> Tensor:
    """Tensor[N] -> Tensor[num_groups]: per-group sums."""
    return torch.zeros(g.num, dtype=values.dtype, device=values.device).index_add_(0, g.index, values)


def _group_reduce(values: Tensor, g: _Groups, reduce: str) -> Tensor:
    """Tensor[N] -> Tensor[num_groups]: per-group "amax" or "amin"."""
    out = torch.zeros(g.num, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, g.index, values, reduce=reduce, include_self=False)


def _group_stats(values: Tensor, g: _Groups) -> tuple[Tensor, Tensor, Tensor]:
    """Per-response group mean, unbiased group std (0 for groups of one) and group spread (max - min).

    Returns:
        three Tensor[N], each response carrying its group's statistic.
    """
    count = _group_sum(torch.ones_like(values), g)
    mean = _group_sum(values, g) / count
    dev2 = _group_sum((values - mean[g.index]) ** 2, g)
    # Unbiased (n - 1) as torch.std; a group of one has no spread, define std 0 instead of NaN.
    std = torch.where(count > 1, dev2 / (count - 1).clamp(min=1), torch.zeros_like(dev2)).sqrt()
    spread = _group_reduce(values, g, "amax") - _group_reduce(values, g, "amin")
    return mean[g.index], std[g.index], spread[g.index]


def _check_values(name: str, t: Tensor) -> None:
    check_1d(name, t)
    check_float(name, t)
    check_finite(name, t)


def group_zscore(values: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """``(v - mean_g) / (std_g + eps)`` per group, exactly 0 for groups of one or with zero spread.

    Args:
        values: Tensor[N] float.
        group_ids: Tensor[N] integer group of each entry.

    Returns:
        Tensor[N] in the dtype of ``values``.
    """
    _check_values("values", values)
    check_int_ids("group_ids", group_ids)
    check_same_length(values=values, group_ids=group_ids)
    mean, std, spread = _group_stats(values, _groups(group_ids))
    z = (values - mean) / (std + eps)
    # Exact zero: (v - mean) can be a rounding residue like 1e-17 when all v are equal.
    return torch.where(spread > 0, z, torch.zeros_like(z))


def batch_zscore(values: Tensor, eps: float = 1e-6) -> Tensor:
    """``(v - mean) / (std + eps)`` over all N entries (unbiased std); all zeros if N < 2 or no spread.

    Args:
        values: Tensor[N] float. Returns Tensor[N].
    """
    _check_values("values", values)
    if values.numel() < 2 or bool(values.max() == values.min()):
        return torch.zeros_like(values)
    return (values - values.mean()) / (values.std() + eps)


def difficulty_weight(adv: Tensor, difficulty: Tensor, question_ids: Tensor, k: float = 0.1) -> Tensor:
    """``exp(k * (D_i - Dbar_q) * sign(A_i)) * A_i``, Dbar_q = mean label over question q's responses.

    Harder-than-family responses get their positive advantages amplified and negative ones damped
    (and vice versa for easier ones). ``k = 0`` is the identity.

    Args:
        adv: Tensor[N] float advantages. difficulty: Tensor[N] float labels D_i.
        question_ids: Tensor[N] integer family of each response.

    Returns:
        Tensor[N] weighted advantages.
    """
    _check_values("adv", adv)
    _check_values("difficulty", difficulty)
    check_int_ids("question_ids", question_ids)
    check_same_length(adv=adv, difficulty=difficulty, question_ids=question_ids)
    d = difficulty.to(adv.dtype)
    dbar, _, _ = _group_stats(d, _groups(question_ids))
    return torch.exp(k * (d - dbar) * torch.sign(adv)) * adv


def range_scale(rewards: Tensor, group_ids: Tensor, r_max: float = 1.0) -> Tensor:
    """Per-response RRB factor ``(max(R_g) - min(R_g)) / r_max`` of the response's group. Tensor[N]."""
    _check_values("rewards", rewards)
    check_int_ids("group_ids", group_ids)
    check_same_length(rewards=rewards, group_ids=group_ids)
    if r_max <= 0:
        raise ValueError(f"r_max must be > 0, got {r_max}")
    _, _, spread = _group_stats(rewards, _groups(group_ids))
    return spread / r_max


def threshold_scale(
    rewards: Tensor, group_ids: Tensor, threshold: float = 0.15, factor: float = 0.1
) -> Tensor:
    """Official RRB factor per response: ``factor`` if all its group's rewards are < ``threshold``, else 1."""
    _check_values("rewards", rewards)
    check_int_ids("group_ids", group_ids)
    check_same_length(rewards=rewards, group_ids=group_ids)
    g = _groups(group_ids)
    gmax = _group_reduce(rewards, g, "amax")[g.index]
    return torch.where(gmax < threshold, torch.full_like(rewards, factor), torch.ones_like(rewards))


@dataclass(frozen=True)
class AdvantageTerms:
    """The DIVA advantage and its two terms, each Tensor[N] (terms after steps 1-4, before weights)."""

    local: Tensor
    global_: Tensor
    merged: Tensor


def diva_advantage_terms(
    rewards: Tensor,
    prompt_ids: Tensor,
    question_ids: Tensor,
    difficulty: Tensor,
    settings: DivaSettings = DivaSettings(),
) -> AdvantageTerms:
    """:func:`diva_advantages` returning the local and global terms too (for monitoring)."""
    _check_values("rewards", rewards)
    check_int_ids("prompt_ids", prompt_ids)
    check_int_ids("question_ids", question_ids)
    _check_values("difficulty", difficulty)
    check_same_length(
        rewards=rewards, prompt_ids=prompt_ids, question_ids=question_ids, difficulty=difficulty
    )
    k, eps, r_max = settings.k, settings.eps, settings.r_max
    a_loc = group_zscore(rewards, prompt_ids, eps)  # step 1
    a_glob = group_zscore(rewards, question_ids, eps)
    if settings.batch_norm:  # step 2
        a_loc, a_glob = batch_zscore(a_loc, eps), batch_zscore(a_glob, eps)
    if settings.difficulty_weighting:  # step 3
        a_glob = difficulty_weight(a_glob, difficulty, question_ids, k)
        if settings.weight_terms == "both":
            a_loc = difficulty_weight(a_loc, difficulty, question_ids, k)
    if settings.rrb == "range":  # step 4
        a_loc = a_loc * range_scale(rewards, prompt_ids, r_max)
        a_glob = a_glob * range_scale(rewards, question_ids, r_max)
    elif settings.rrb == "threshold":
        a_loc = a_loc * threshold_scale(rewards, prompt_ids, settings.rrb_threshold, settings.rrb_factor)
        a_glob = a_glob * threshold_scale(rewards, question_ids, settings.rrb_threshold, settings.rrb_factor)
    merged = settings.local_weight * a_loc + settings.global_weight * a_glob  # step 5
    return AdvantageTerms(a_loc, a_glob, merged)


def diva_advantages(
    rewards: Tensor,
    prompt_ids: Tensor,
    question_ids: Tensor,
    difficulty: Tensor,
    settings: DivaSettings = DivaSettings(),
) -> Tensor:
    """The DIVA advantage of each response (module docstring lists the steps).

    Args:
        rewards: Tensor[N] float, finite.
        prompt_ids: Tensor[N] integer local group. question_ids: Tensor[N] integer family.
        difficulty: Tensor[N] float label D_i of the prompt each response answers.
        settings: the estimator's :class:`DivaSettings` (defaults: the paper's).

    Returns:
        Tensor[N] in the rewards' dtype.

    Raises:
        ValueError: non-1-D inputs, non-integer ids, mismatched lengths (names and lengths listed),
            NaN/inf rewards (indices listed); unknown ``rrb``/``weight_terms`` when ``settings`` is built.
    """
    return diva_advantage_terms(rewards, prompt_ids, question_ids, difficulty, settings).merged


def grpo_advantages(
    rewards: Tensor, prompt_ids: Tensor, *, scale: GrpoScale = "group", eps: float = 1e-6
) -> Tensor:
    """Vanilla GRPO advantages (TRL semantics): ``r - mean_g`` divided by a scale.

    ``scale="group"``: by ``std_g + eps`` (original GRPO); ``"batch"``: by ``std(all rewards) + eps``;
    ``"none"``: not divided (Dr.GRPO). Groups of one or with zero spread give exactly 0 in every mode.

    Args:
        rewards: Tensor[N] float. prompt_ids: Tensor[N] integer group of each response.

    Returns:
        Tensor[N] in the rewards' dtype.
    """
    _check_values("rewards", rewards)
    check_int_ids("prompt_ids", prompt_ids)
    check_same_length(rewards=rewards, prompt_ids=prompt_ids)
    check_choice("scale", scale, GrpoScale)
    mean, std, spread = _group_stats(rewards, _groups(prompt_ids))
    centred = rewards - mean
    if scale == "group":
        centred = centred / (std + eps)
    elif scale == "batch":
        batch_std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        centred = centred / (batch_std + eps)
    return torch.where(spread > 0, centred, torch.zeros_like(centred))
