"""DAPO dynamic sampling: group keep masks and the fixed-size selection over several draws.

Hand-worked cases, hypothesis properties (whole units only, exact batch size, determinism, agreement with
the advantage's zero-spread rule) and a dict-based python reference of both functions.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.advantage import group_zscore
from diva_lightning.core.filtering import SpreadFilter, select_units, spread_filter


def _t(xs: list[float]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def _ids(xs: list[int]) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


def test_spread_filter_hand_worked() -> None:
    # groups (first seen order 7, 2, 5, 9): 7 -> [1, 1] no spread, 2 -> [0, 1] spread,
    # 5 -> [0.1, 0.1] no spread, 9 -> [1] a single response (kept by verl's rule)
    rewards = _t([1, 0, 1, 0.1, 1, 0.1, 1])
    groups = _ids([7, 2, 7, 5, 2, 5, 9])
    f = spread_filter(rewards, groups)
    assert f.unit_index.tolist() == [0, 1, 0, 2, 1, 2, 3]
    assert f.unit_keep.tolist() == [False, True, False, True]
    assert f.unit_size.tolist() == [2, 2, 2, 1]
    assert f.keep.tolist() == [False, True, False, False, True, False, True]
    assert (f.num_units, f.num_spread_units, f.num_rollouts) == (4, 2, 7)
    strict = spread_filter(rewards, groups, keep_singletons=False)
    assert strict.unit_keep.tolist() == [False, True, False, False]


def test_family_units_are_kept_or_dropped_whole() -> None:
    # family 0 = groups 0 ([1, 1]) and 1 ([1, 1]): all rewards equal -> dropped.
    # family 1 = groups 2 ([0, 0]) and 3 ([1, 1]): each group has zero spread but the family has spread
    # (DIVA's global advantage is non-zero there) -> kept whole, zero-spread groups included.
    rewards = _t([1, 1, 0, 0, 1, 1, 1, 1])
    groups = _ids([0, 0, 2, 2, 3, 3, 1, 1])
    families = _ids([0, 0, 1, 1, 1, 1, 0, 0])
    f = spread_filter(rewards, groups, family_ids=families)
    assert f.unit_keep.tolist() == [False, True] and f.unit_size.tolist() == [4, 4]
    assert f.keep.tolist() == [False, False, True, True, True, True, False, False]
    # per prompt group alone every group would be dropped
    assert not bool(spread_filter(rewards, groups).keep.any())
    with pytest.raises(ValueError, match="span several families"):
        spread_filter(rewards, groups, family_ids=_ids([0, 0, 1, 1, 1, 0, 0, 0]))


def _draw(rewards: list[float], groups: list[int]) -> SpreadFilter:
    return spread_filter(_t(rewards), _ids(groups), keep_singletons=False)


def test_select_units_hand_worked() -> None:
    # draw 1: units a (no spread), b, c (spread); draw 2: units d (spread), e (no spread), f (spread)
    d1 = _draw([1, 1, 0, 1, 1, 0], [0, 0, 1, 1, 2, 2])
    d2 = _draw([0, 1, 0, 0, 1, 0], [4, 4, 5, 5, 6, 6])
    sel = select_units([d1, d2], 3)
    # first three spread units in draw order: b, c, d
    assert [k.tolist() for k in sel.keep] == [[False, False, True, True, True, True], [True, True] + [False] * 4]
    assert (sel.num_units, sel.num_filled, sel.generated_rollouts, sel.kept_rollouts) == (3, 0, 12, 6)
    assert (sel.generated_units, sel.spread_units) == (6, 4)
    # 5 units but only 4 with spread: all four, then the first zero-spread unit in draw order (a)
    sel5 = select_units([d1, d2], 5)
    assert [k.tolist() for k in sel5.keep] == [[True] * 6, [True, True, False, False, True, True]]
    assert (sel5.num_units, sel5.num_filled, sel5.kept_rollouts) == (5, 1, 10)
    # without filling the batch is short and says so
    short = select_units([d1, d2], 5, fill=False)
    assert (short.num_units, short.num_filled, short.kept_rollouts) == (4, 0, 8)
    with pytest.raises(ValueError, match="hold 6 units"):
        select_units([d1, d2], 7)
    with pytest.raises(ValueError, match="target"):
        select_units([d1], -1)
    assert select_units([], 0).num_units == 0


def _spread_reference(rewards: list[float], units: list[int], keep_singletons: bool) -> list[bool]:
    """Per-response keep flags from a dict of each unit's reward list."""
    by_unit: dict[int, list[float]] = {}
    for r, u in zip(rewards, units):
        by_unit.setdefault(u, []).append(r)
    keep = {u: len(set(v)) > 1 or (keep_singletons and len(v) == 1) for u, v in by_unit.items()}
    return [keep[u] for u in units]


def _select_reference(draws: list[tuple[list[int], list[bool]]], target: int, fill: bool) -> list[list[bool]]:
    """(unit of each response, keep of each response) per draw -> per-response selection, by lists."""
    order = []  # (draw, unit, has spread) in draw order, then first appearance
    for d, (units, keep) in enumerate(draws):
        seen: list[int] = []
        for u, k in zip(units, keep):
            if u not in seen:
                seen.append(u)
                order.append((d, u, k))
    chosen = [(d, u) for d, u, k in order if k][:target]
    if fill:
        chosen += [(d, u) for d, u, k in order if not k][: target - len(chosen)]
    return [[(d, u) in chosen for u in units] for d, (units, _) in enumerate(draws)]


draw_strategy = st.lists(
    st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 0.1, 1.0])), min_size=0, max_size=10),
    min_size=1,
    max_size=4,
)


@settings(max_examples=80, deadline=None)
@given(draws=draw_strategy, target=st.integers(0, 8), fill=st.booleans(), singles=st.booleans())
def test_selection_matches_reference_and_properties(
    draws: list[list[tuple[int, float]]], target: int, fill: bool, singles: bool
) -> None:
    filters, ref_inputs = [], []
    for rows in draws:
        groups, rewards = [g for g, _ in rows], [r for _, r in rows]
        f = spread_filter(_t(rewards), _ids(groups), keep_singletons=singles)
        assert f.keep.tolist() == _spread_reference(rewards, groups, singles)
        filters.append(f)
        ref_inputs.append((groups, f.keep.tolist()))
    total_units = sum(f.num_units for f in filters)
    if fill and total_units < target:
        with pytest.raises(ValueError):
            select_units(filters, target, fill=fill)
        return
    sel = select_units(filters, target, fill=fill)
    assert [k.tolist() for k in sel.keep] == _select_reference(ref_inputs, target, fill)
    # whole units only: every response of a unit shares its unit's fate
    for f, k in zip(filters, sel.keep):
        for u in range(f.num_units):
            assert len(set(k[f.unit_index == u].tolist())) <= 1
    spread = sum(f.num_spread_units for f in filters)
    assert sel.num_units == (target if fill else min(target, spread))
    assert sel.num_filled == (max(0, target - spread) if fill else 0)
    assert sel.generated_rollouts == sum(len(r) for r in draws)
    assert sel.kept_rollouts == sum(int(k.sum()) for k in sel.keep) <= sel.generated_rollouts
    again = select_units(filters, target, fill=fill)  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(again.keep, sel.keep))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 5), st.sampled_from([0.0, 0.1, 0.9, 1.0])), min_size=1, max_size=16))
def test_dropped_groups_are_exactly_the_zero_advantage_groups(rows: list[tuple[int, float]]) -> None:
    groups, rewards = _ids([g for g, _ in rows]), _t([r for _, r in rows])
    f = spread_filter(rewards, groups, keep_singletons=False)
    z = group_zscore(rewards, groups)
    for u in range(f.num_units):
        in_unit = f.unit_index == u
        assert bool(f.unit_keep[u]) == bool((z[in_unit] != 0).any())


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 7), st.sampled_from([0.0, 0.1, 1.0])), min_size=1, max_size=16))
def test_family_filter_matches_reference_on_family_ids(rows: list[tuple[int, float]]) -> None:
    # family of group g is g // 3, so every group lies inside one family
    groups = [g for g, _ in rows]
    families = [g // 3 for g in groups]
    rewards = [r for _, r in rows]
    f = spread_filter(_t(rewards), _ids(groups), family_ids=_ids(families))
    assert f.keep.tolist() == _spread_reference(rewards, families, True)
