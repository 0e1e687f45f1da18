"""DAPO-style dynamic sampling: keep whole groups whose rewards differ (issue 14 item 3, math only).

DAPO (Yu et al. 2025, arXiv 2503.14476) drops the prompts whose G responses all got the same reward
(zero spread: zero GRPO advantage, no learning signal) and draws more prompts until the batch holds
the target number of groups. verl's ``algorithm.filter_groups`` keeps a group when the std of its
metric is > 0 or it has a single response, accumulates draws until ``train_batch_size`` groups are
kept (at most ``max_num_gen_batches`` draws) and then takes the first groups in draw order.

Two pure pieces for the caller's draw loop:

1. :func:`spread_filter` marks, for one draw, which *units* have non-zero spread (max - min > 0, the
   test :func:`diva_lightning.core.advantage.group_zscore` uses). A unit is a prompt group, or with
   ``family_ids`` a whole family (a question and its variants: DIVA's global group), so a family is kept
   or dropped as a whole and never split. Filters that split groups corrupt the group baseline
   (NeMo-RL #3469).
2. :func:`select_units` takes the filters of several draws and picks exactly ``target`` units in a
   deterministic order (draw by draw, units in first-seen order within a draw), so every rank trains on
   the same number of units and no collective hangs (verl #5228). When the draws hold too few units
   with spread (the resample budget ran out), it fills up with zero-spread units in the same order:
   they add no gradient but keep the batch shape. Budgets count *generated* rollouts
   (``Selection.generated_rollouts``), not kept ones.

Every rank must make the same number of draws when generation is collective: the caller reduces the
per-rank ``num_spread_units`` with a MIN across ranks before deciding to draw again.
"""

from __future__ import annotations

from collections.abc import Sequence
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


@dataclass(frozen=True)
class SpreadFilter:
    """Which units of one draw carry a learning signal.

    Attributes:
        keep: Tensor[N] bool, True on the responses of kept units.
        unit_index: Tensor[N] int64, each response's unit in first-seen order (0 = the first unit seen).
        unit_keep: Tensor[U] bool, True for units with spread (or singletons when kept).
        unit_size: Tensor[U] int64, responses per unit.
    """

    keep: Tensor
    unit_index: Tensor
    unit_keep: Tensor
    unit_size: Tensor

    @property
    def num_units(self) -> int:
        return int(self.unit_keep.numel())

    @property
    def num_spread_units(self) -> int:
        return int(self.unit_keep.sum())

    @property
    def num_rollouts(self) -> int:
        return int(self.keep.numel())


def _first_seen_index(ids: Tensor) -> tuple[Tensor, int]:
    """Dense index of each entry's id in first-seen order: Tensor[N] int64, and the number of ids."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    n = ids.numel()
    first = torch.full((uniq.numel(),), n, dtype=torch.int64, device=ids.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=ids.device), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first)] = torch.arange(uniq.numel(), device=ids.device)
    return rank[inverse], int(uniq.numel())


def spread_filter(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    family_ids: Tensor | None = None,
    keep_singletons: bool = True,
) -> SpreadFilter:
    """Mark the units of one draw whose rewards are not all equal.

    Args:
        rewards: Tensor[N] float, finite.
        group_ids: Tensor[N] integer prompt group of each response.
        family_ids: Tensor[N] integer family of each response, or None. When given, the unit is the
            family; every prompt group must lie inside one family.
        keep_singletons: keep units of a single response (verl's rule: their spread cannot be judged).

    Returns:
        :class:`SpreadFilter`.
    """
    check_1d("rewards", rewards)
    check_float("rewards", rewards)
    check_finite("rewards", rewards)
    check_int_ids("group_ids", group_ids)
    check_same_length(rewards=rewards, group_ids=group_ids)
    units = group_ids
    if family_ids is not None:
        check_int_ids("family_ids", family_ids)
        check_same_length(rewards=rewards, family_ids=family_ids)
        pairs = torch.unique(torch.stack([group_ids, family_ids]), dim=1)  # [2, distinct (group, family)]
        groups, counts = torch.unique(pairs[0], return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(
                f"prompt groups {groups[counts > 1].tolist()[:10]} span several families; a group must "
                "lie inside one family"
            )
        units = family_ids
    index, num = _first_seen_index(units)
    size = torch.bincount(index, minlength=num)
    empty = torch.zeros(num, dtype=rewards.dtype, device=rewards.device)
    hi = empty.scatter_reduce(0, index, rewards, reduce="amax", include_self=False)
    lo = empty.scatter_reduce(0, index, rewards, reduce="amin", include_self=False)
    unit_keep = hi > lo
    if keep_singletons:
        unit_keep = unit_keep | (size == 1)
    return SpreadFilter(unit_keep[index], index, unit_keep, size)


@dataclass(frozen=True)
class Selection:
    """The units chosen for one training batch from several draws.

    Attributes:
        keep: one Tensor[N_d] bool per draw, True on the responses that enter the batch.
        num_units: units selected (= target unless ``fill=False`` and too few had spread).
        num_filled: zero-spread units used to fill up (the resample budget ran out).
        generated_rollouts: responses generated over all draws (what budgets count).
        kept_rollouts: responses in the batch.
        generated_units: units over all draws.
        spread_units: units with spread over all draws.
    """

    keep: list[Tensor]
    num_units: int
    num_filled: int
    generated_rollouts: int
    kept_rollouts: int
    generated_units: int
    spread_units: int


def select_units(draws: Sequence[SpreadFilter], target: int, *, fill: bool = True) -> Selection:
    """Pick exactly ``target`` units from the draws, units with spread first, deterministic order.

    Order: draw by draw, and within a draw by first appearance. The first ``target`` units with spread
    are taken; if there are fewer and ``fill``, zero-spread units follow in the same order.

    Args:
        draws: one :class:`SpreadFilter` per draw, in draw order.
        target: units per batch (>= 0).
        fill: top up with zero-spread units when too few have spread.

    Returns:
        :class:`Selection`.

    Raises:
        ValueError: ``target < 0``, or ``fill`` and the draws hold fewer than ``target`` units in all.
    """
    if target < 0:
        raise ValueError(f"target must be >= 0, got {target}")
    generated_units = sum(d.num_units for d in draws)
    if fill and generated_units < target:
        raise ValueError(f"the draws hold {generated_units} units in all; cannot fill a batch of {target}")
    spread_left = target
    chosen_units: list[Tensor] = []  # per draw, Tensor[U_d] bool
    for d in draws:
        rank = torch.cumsum(d.unit_keep.to(torch.int64), 0)  # 1-based rank of each spread unit in this draw
        pick = d.unit_keep & (rank <= spread_left)
        spread_left -= int(pick.sum())
        chosen_units.append(pick)
    fill_left = spread_left if fill else 0
    num_filled = fill_left
    for i, d in enumerate(draws):
        if fill_left == 0:
            break
        rest = ~d.unit_keep
        rank = torch.cumsum(rest.to(torch.int64), 0)
        pick = rest & (rank <= fill_left)
        fill_left -= int(pick.sum())
        chosen_units[i] = chosen_units[i] | pick
    keep = [c[d.unit_index] for c, d in zip(chosen_units, draws, strict=True)]
    return Selection(
        keep=keep,
        num_units=sum(int(c.sum()) for c in chosen_units),
        num_filled=num_filled,
        generated_rollouts=sum(d.num_rollouts for d in draws),
        kept_rollouts=sum(int(k.sum()) for k in keep),
        generated_units=generated_units,
        spread_units=sum(d.num_spread_units for d in draws),
    )
