"""Advantage estimators: hand-worked values, properties, a python-loop reference and the TRL formula."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from diva_lightning.core import contiguous_ids
from diva_lightning.core.advantage import (
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

F64 = torch.float64
EPS = 1e-6


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64)


def ids(*xs: int) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.int64)


# ---- hand-worked -----------------------------------------------------------------------------------


def test_group_zscore_hand_worked() -> None:
    # group 0: [1, 0, 0] mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    #   -> (2/3) / sqrt(1/3) = 1.1547, (-1/3) / sqrt(1/3) = -0.5774
    # group 1: [0.5, 0.5] zero spread -> 0;  group 2: [0.7] alone -> 0
    z = group_zscore(t(1, 0, 0, 0.5, 0.5, 0.7), ids(0, 0, 0, 1, 1, 2), eps=0.0)
    s = math.sqrt(1 / 3)
    assert z.tolist() == pytest.approx([(2 / 3) / s, (-1 / 3) / s, (-1 / 3) / s, 0, 0, 0])
    assert z[3:].tolist() == [0.0, 0.0, 0.0]  # exactly


def test_batch_zscore_hand_worked() -> None:
    # [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1]
    assert batch_zscore(t(1, 2, 3), eps=0.0).tolist() == [-1, 0, 1]
    assert batch_zscore(t(4, 4)).tolist() == [0, 0] and batch_zscore(t(4)).tolist() == [0]


def test_difficulty_weight_hand_worked() -> None:
    # family 0 labels [4, 6] -> mean 5; family 1 label [5] -> mean 5
    # A=+1, D=4: exp(0.1*(-1)*(+1)) = e^-0.1; A=-2, D=6: exp(0.1*1*(-1)) * -2 = -2 e^-0.1
    # A=+1, D=5 (alone in family): exp(0) = 1
    w = difficulty_weight(t(1, -2, 1), t(4, 6, 5), ids(0, 0, 1), k=0.1)
    assert w.tolist() == pytest.approx([math.exp(-0.1), -2 * math.exp(-0.1), 1.0])
    # the harder response's positive advantage is amplified
    w2 = difficulty_weight(t(-1, 1), t(4, 6), ids(0, 0), k=0.1)
    assert w2.tolist() == pytest.approx([-math.exp(0.1), math.exp(0.1)])


def test_rrb_factors_hand_worked() -> None:
    r = t(0.1, 1.0, 0.1, 0.1, 0.05, 0.2)
    g = ids(0, 0, 1, 1, 2, 2)
    # range: group 0 spread 0.9, group 1 spread 0, group 2 spread 0.15 (r_max 1)
    assert range_scale(r, g).tolist() == pytest.approx([0.9, 0.9, 0, 0, 0.15, 0.15])
    # threshold: group 1 all < 0.15 -> 0.1; group 2 has 0.2 >= 0.15 -> 1; group 0 -> 1
    assert threshold_scale(r, g).tolist() == pytest.approx([1, 1, 0.1, 0.1, 1, 1])


def test_diva_hand_worked_two_prompts_one_family() -> None:
    # one question: original prompt 0 rewards [1, 0] (label D=5), variant prompt 1 rewards [0, 0] (D=6)
    r, p, q, d = t(1, 0, 0, 0), ids(0, 0, 1, 1), ids(0, 0, 0, 0), t(5, 5, 6, 6)
    # step 1: local: prompt 0 mean .5 std sqrt(.5) -> [.7071, -.7071]; prompt 1 zero spread -> [0, 0]
    #         global: mean .25, std sqrt((.75^2 + 3 * .25^2)/3) = .5 -> [1.5, -.5, -.5, -.5]
    off = DivaSettings(batch_norm=False, difficulty_weighting=False, rrb=None, eps=0.0)
    terms = diva_advantage_terms(r, p, q, d, off)
    assert terms.local.tolist() == pytest.approx([math.sqrt(0.5), -math.sqrt(0.5), 0, 0])
    assert terms.global_.tolist() == pytest.approx([1.5, -0.5, -0.5, -0.5])
    # step 3: Dbar = 5.5; A=1.5, D=5: exp(.1 * -.5 * 1) = e^-.05; A=-.5, D=5: e^{+.05}; D=6: e^{-.05}
    w = diva_advantage_terms(r, p, q, d, DivaSettings(batch_norm=False, rrb=None, eps=0.0))
    e = math.exp(0.05)
    assert w.global_.tolist() == pytest.approx([1.5 / e, -0.5 * e, -0.5 / e, -0.5 / e])
    # step 4 range: prompt 0 spread 1, prompt 1 spread 0 -> local [.7071, -.7071, 0, 0]; family spread 1
    full = diva_advantages(r, p, q, d, DivaSettings(batch_norm=False, eps=0.0))
    assert full.tolist() == pytest.approx(
        [math.sqrt(0.5) + 1.5 / e, -math.sqrt(0.5) - 0.5 * e, -0.5 / e, -0.5 / e]
    )


def test_grpo_hand_worked() -> None:
    # group [1, 0, 0, 1]: mean .5, unbiased std sqrt(1/3) -> +-.5/.57735 = +-.866; group [2] alone -> 0
    r, p = t(1, 0, 0, 1, 2), ids(0, 0, 0, 0, 1)
    assert grpo_advantages(r, p, eps=0.0).tolist() == pytest.approx(
        [0.866025, -0.866025, -0.866025, 0.866025, 0], abs=1e-6
    )
    assert grpo_advantages(r, p, scale="none").tolist() == [0.5, -0.5, -0.5, 0.5, 0.0]
    # batch std of [1,0,0,1,2] = sqrt(((.2)^2*2 + (.8)^2*2 + 1.2^2)/4) = sqrt(.7)
    b = grpo_advantages(r, p, scale="batch", eps=0.0)
    assert b.tolist() == pytest.approx([x / math.sqrt(0.7) for x in (0.5, -0.5, -0.5, 0.5)] + [0.0])


# ---- errors ------------------------------------------------------------------------------------------


def test_nan_and_inf_rewards_are_named() -> None:
    with pytest.raises(ValueError, match=r"rewards has NaN or infinite values at indices \[1, 3\]"):
        diva_advantages(t(0, math.nan, 1, math.inf), ids(0, 0, 1, 1), ids(0, 0, 0, 0), t(5, 5, 5, 5))
    with pytest.raises(ValueError, match=r"indices \[0\]"):
        grpo_advantages(t(-math.inf, 1), ids(0, 0))


def test_mismatched_lengths_are_named() -> None:
    with pytest.raises(ValueError, match="rewards=3, prompt_ids=2, question_ids=3, difficulty=3"):
        diva_advantages(t(0, 1, 1), ids(0, 0), ids(0, 0, 0), t(5, 5, 5))
    with pytest.raises(ValueError, match="rewards=2, prompt_ids=3"):
        grpo_advantages(t(0, 1), ids(0, 0, 1))


def test_shape_and_dtype_errors() -> None:
    with pytest.raises(ValueError, match="1-D"):
        grpo_advantages(torch.zeros(2, 2), ids(0, 0))
    with pytest.raises(ValueError, match="integer tensor of group ids"):
        grpo_advantages(t(0, 1), t(0, 0))
    with pytest.raises(ValueError, match="rrb"):
        diva_advantages(t(0, 1), ids(0, 0), ids(0, 0), t(5, 5), DivaSettings(rrb="clip"))


def test_contiguous_ids_first_seen_order() -> None:
    assert contiguous_ids(["q7", "q2", "q7", ("x", 1)]).tolist() == [0, 1, 0, 2]


# ---- edge cases ----------------------------------------------------------------------------------------


def test_group_size_one_and_all_equal_rewards_give_zero() -> None:
    zeros = [0.0] * 4
    r1 = t(1, 0, 1, 0)
    assert grpo_advantages(r1, ids(0, 1, 2, 3)).tolist() == zeros  # every group of one
    assert diva_advantages(r1, ids(0, 1, 2, 3), ids(0, 1, 2, 3), t(5, 5, 5, 5)).tolist() == zeros
    for scale in ("group", "batch", "none"):
        assert grpo_advantages(t(0.3, 0.3, 0.3, 0.3), ids(0, 0, 1, 1), scale=scale).tolist() == zeros
    assert (
        diva_advantages(t(0.1, 0.1, 0.1, 0.1), ids(0, 0, 1, 1), ids(0, 0, 0, 0), t(4, 4, 6, 6)).tolist()
        == zeros
    )


def test_single_question_local_equals_global_without_variants() -> None:
    # V=0: one prompt per question -> the two terms coincide; merged = 2 * term (default weights 1, 1)
    r = t(1, 0, 0.5, 1, 0)
    terms = diva_advantage_terms(r, ids(0, 0, 0, 0, 0), ids(0, 0, 0, 0, 0), t(5, 5, 5, 5, 5))
    assert torch.allclose(terms.local, terms.global_)
    assert torch.allclose(terms.merged, 2 * terms.local)


def test_batch_norm_only_rescales_group_zscores() -> None:
    # group z-scores sum to 0 per group, hence over the batch: batch norm divides by the batch std only,
    # so the zero-spread prompt 1 stays at 0 with RRB off too.
    r, p, q = t(1, 0, 0, 0, 1, 0.5), ids(0, 0, 1, 1, 2, 2), ids(0, 0, 1, 1, 2, 2)
    raw = group_zscore(r, p)
    off = DivaSettings(rrb=None, difficulty_weighting=False)
    normed = diva_advantage_terms(r, p, q, t(5, 5, 5, 5, 5, 5), off).local
    assert torch.allclose(normed, raw / (raw.std() + EPS))
    assert normed[2:4].tolist() == [0.0, 0.0]


# ---- properties ----------------------------------------------------------------------------------------


@st.composite
def batches(draw: st.DrawFn, max_questions: int = 4) -> tuple[torch.Tensor, ...]:
    """Random families: Q questions, P prompts each, G responses per prompt, rewards from a small grid."""
    nq = draw(st.integers(1, max_questions))
    npr = draw(st.integers(1, 3))
    g = draw(st.integers(1, 5))
    n = nq * npr * g
    grid = draw(st.sampled_from([[0.0, 1.0], [0.0, 0.1, 0.9, 1.0], [0.0, 0.25, 0.5, 0.75, 1.0]]))
    rewards = draw(st.lists(st.sampled_from(grid), min_size=n, max_size=n))
    diffs = draw(st.lists(st.floats(1, 9), min_size=nq * npr, max_size=nq * npr))
    q = torch.arange(nq).repeat_interleave(npr * g)
    p = torch.arange(nq * npr).repeat_interleave(g)
    d = torch.tensor(diffs, dtype=F64).repeat_interleave(g)
    return torch.tensor(rewards, dtype=F64), p, q, d


FAST = settings(max_examples=60, deadline=None)


@FAST
@given(b=batches())
def test_group_zscore_sums_to_zero_per_group(b: tuple[torch.Tensor, ...]) -> None:
    r, p, q, _ = b
    for gids in (p, q):
        z = group_zscore(r, gids)
        sums = torch.zeros(int(gids.max()) + 1, dtype=F64).index_add_(0, gids, z)
        assert torch.allclose(sums, torch.zeros_like(sums), atol=1e-9)


@FAST
@given(b=batches(), shift=st.floats(-5, 5), scale_name=st.sampled_from(["group", "batch", "none"]))
def test_shift_invariance(b: tuple[torch.Tensor, ...], shift: float, scale_name: str) -> None:
    r, p, q, d = b
    base = diva_advantages(r, p, q, d, DivaSettings(rrb=None))
    assert torch.allclose(diva_advantages(r + shift, p, q, d, DivaSettings(rrb=None)), base, atol=1e-6)
    g = grpo_advantages(r, p, scale=scale_name)
    assert torch.allclose(grpo_advantages(r + shift, p, scale=scale_name), g, atol=1e-6)


@FAST
@given(b=batches(), c=st.floats(0.1, 10))
def test_scale_invariance_where_it_holds(b: tuple[torch.Tensor, ...], c: float) -> None:
    r, p, q, d = b
    # z-scores are scale invariant (up to eps), so DIVA without RRB and GRPO(group/batch) are too;
    # "range" RRB and Dr.GRPO are scale-equivariant instead (factor c).
    kw = {"eps": 1e-12}
    assert torch.allclose(
        diva_advantages(r * c, p, q, d, DivaSettings(rrb=None, **kw)),
        diva_advantages(r, p, q, d, DivaSettings(rrb=None, **kw)),
        atol=1e-6,
    )
    assert torch.allclose(grpo_advantages(r * c, p, **kw), grpo_advantages(r, p, **kw), atol=1e-6)
    assert torch.allclose(
        diva_advantages(r * c, p, q, d, DivaSettings(**kw)),
        c * diva_advantages(r, p, q, d, DivaSettings(**kw)),
        atol=1e-6,
    )
    assert torch.allclose(
        grpo_advantages(r * c, p, scale="none"), c * grpo_advantages(r, p, scale="none"), atol=1e-9
    )


@FAST
@given(b=batches())
def test_zero_spread_groups_give_zero(b: tuple[torch.Tensor, ...]) -> None:
    r, p, q, d = b
    g = torch.unique(p)
    spread = torch.stack([r[p == i].max() - r[p == i].min() for i in g])
    flat = torch.isin(p, g[spread == 0])
    assume(bool(flat.any()))
    for scale in ("group", "batch", "none"):
        assert bool((grpo_advantages(r, p, scale=scale)[flat] == 0).all())
    assert bool((group_zscore(r, p)[flat] == 0).all())
    assert bool((diva_advantage_terms(r, p, q, d).local[flat] == 0).all())  # RRB range silences them


@FAST
@given(b=batches())
def test_k_zero_is_no_weighting(b: tuple[torch.Tensor, ...]) -> None:
    r, p, q, d = b
    assert torch.equal(
        diva_advantages(r, p, q, d, DivaSettings(k=0.0)),
        diva_advantages(r, p, q, d, DivaSettings(difficulty_weighting=False)),
    )


# ---- independent references ---------------------------------------------------------------------------


def _zscore_loop(values: list[float], groups: list[int], eps: float) -> list[float]:
    out = []
    for i, v in enumerate(values):
        members = [values[j] for j in range(len(values)) if groups[j] == groups[i]]
        if len(members) < 2 or max(members) == min(members):
            out.append(0.0)
        else:
            out.append((v - statistics.fmean(members)) / (statistics.stdev(members) + eps))
    return out


def _diva_loop(
    r: list[float],
    p: list[int],
    q: list[int],
    d: list[float],
    *,
    k: float,
    batch_norm: bool,
    weighting: bool,
    weight_terms: str,
    rrb: str | None,
    wl: float,
    wg: float,
    eps: float,
) -> list[float]:
    """The five steps of design.md section 5 written straight from the text, one response at a time."""
    n = len(r)
    loc, glob = _zscore_loop(r, p, eps), _zscore_loop(r, q, eps)
    if batch_norm:
        loc, glob = _zscore_loop(loc, [0] * n, eps), _zscore_loop(glob, [0] * n, eps)

    def weight(a: list[float]) -> list[float]:
        out = []
        for i in range(n):
            dbar = statistics.fmean(d[j] for j in range(n) if q[j] == q[i])
            sign = (a[i] > 0) - (a[i] < 0)
            out.append(math.exp(k * (d[i] - dbar) * sign) * a[i])
        return out

    if weighting:
        glob = weight(glob)
        if weight_terms == "both":
            loc = weight(loc)

    def factor(i: int, groups: list[int]) -> float:
        members = [r[j] for j in range(n) if groups[j] == groups[i]]
        if rrb == "range":
            return max(members) - min(members)
        if rrb == "threshold":
            return 0.1 if all(m < 0.15 for m in members) else 1.0
        return 1.0

    return [wl * loc[i] * factor(i, p) + wg * glob[i] * factor(i, q) for i in range(n)]


@settings(max_examples=50, deadline=None)
@given(
    b=batches(),
    k=st.sampled_from([0.0, 0.1, 0.5]),
    batch_norm=st.booleans(),
    weighting=st.booleans(),
    weight_terms=st.sampled_from(["global", "both"]),
    rrb=st.sampled_from(["range", "threshold", None]),
    wl=st.sampled_from([0.0, 0.5, 1.0]),
    wg=st.sampled_from([1.0, 2.0]),
)
def test_diva_matches_python_loop_reference(
    b: tuple[torch.Tensor, ...],
    k: float,
    batch_norm: bool,
    weighting: bool,
    weight_terms: str,
    rrb: str | None,
    wl: float,
    wg: float,
) -> None:
    r, p, q, d = b
    got = diva_advantages(
        r,
        p,
        q,
        d,
        DivaSettings(
            k=k,
            batch_norm=batch_norm,
            difficulty_weighting=weighting,
            weight_terms=weight_terms,
            rrb=rrb,
            local_weight=wl,
            global_weight=wg,
        ),
    )
    want = _diva_loop(
        r.tolist(),
        p.tolist(),
        q.tolist(),
        d.tolist(),
        k=k,
        batch_norm=batch_norm,
        weighting=weighting,
        weight_terms=weight_terms,
        rrb=rrb,
        wl=wl,
        wg=wg,
        eps=EPS,
    )
    assert got.tolist() == pytest.approx(want, abs=1e-9)


def _trl_grpo(rewards: torch.Tensor, g: int, scale: str, eps: float) -> torch.Tensor:
    """TRL GRPOTrainer's formula for equal-size contiguous groups (trl/trainer/grpo_trainer.py)."""
    mean_grouped = rewards.view(-1, g).mean(dim=1).repeat_interleave(g, dim=0)
    advantages = rewards - mean_grouped
    if scale == "group":
        std = rewards.view(-1, g).std(dim=1).repeat_interleave(g, dim=0)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return advantages
    return advantages / (std + eps)


@settings(max_examples=60, deadline=None)
@given(
    n_groups=st.integers(1, 6),
    g=st.integers(2, 6),
    scale=st.sampled_from(["group", "batch", "none"]),
    data=st.data(),
)
def test_grpo_matches_trl_formula(n_groups: int, g: int, scale: str, data: st.DataObject) -> None:
    n = n_groups * g
    vals = data.draw(st.lists(st.floats(-3, 3, allow_nan=False), min_size=n, max_size=n))
    r = torch.tensor(vals, dtype=F64)
    # TRL leaves a tiny residue where a group has no spread; we return an exact 0 there.
    want = _trl_grpo(r, g, scale, 1e-4)
    flat = (r.view(-1, g).amax(1) == r.view(-1, g).amin(1)).repeat_interleave(g)
    want = torch.where(flat, torch.zeros_like(want), want)
    got = grpo_advantages(r, torch.arange(n_groups).repeat_interleave(g), scale=scale, eps=1e-4)
    assert torch.allclose(got, want, atol=1e-9)


def test_float32_input_keeps_dtype() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p = ids(0, 0, 1, 1)
    assert diva_advantages(r, p, ids(0, 0, 0, 0), torch.tensor([5.0, 5.0, 6.0, 6.0])).dtype == torch.float32
    assert grpo_advantages(r, p).dtype == torch.float32
