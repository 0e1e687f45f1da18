"""Loss variants: GSPO sequence ratio, importance-sampling weights, truncated completions, Dr.GRPO's constant.

Hand-worked values, hypothesis properties, and independent references: a sequence-level GSPO objective
written without the stop-gradient trick (value and gradient compared) and a per-token python loop.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.loss import AGGS, RATIO_LEVELS, policy_loss, truncation_mask

F64 = torch.float64


def test_constants() -> None:
    assert RATIO_LEVELS == ("token", "sequence")
    with pytest.raises(ValueError, match="ratio_level"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1), torch.ones(1, 1), ratio_level="seq")


# ---- GSPO -------------------------------------------------------------------------------------------


def test_gspo_hand_worked_value_and_gradient() -> None:
    # one sequence, tokens 0-1 real, token 2 padding (NaN on purpose); A = -1, clip [0.8, 1.3], no dual clip
    # token log-ratios: [log 2, 0] -> s = exp((log 2 + 0) / 2) = sqrt(2) = 1.41421
    logp = torch.tensor([[math.log(2.0), 0.0, math.nan]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.0, 0.0, math.nan]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([-1.0], dtype=F64)
    loss, stats = policy_loss(logp, old, adv, mask, ratio_level="sequence", dual_clip=None)
    # each token: max(-A s, -A clip(s)) = max(1.41421, 1.3) = 1.41421 (unclipped); token mean of 2 = 1.41421
    assert loss.item() == pytest.approx(math.sqrt(2))
    assert stats.ratio_mean.item() == pytest.approx(math.sqrt(2)) and stats.ratio_max.item() == pytest.approx(
        math.sqrt(2)
    )
    # approx_kl stays per token: ((2 - 1) - log 2 + 0) / 2 = 0.15343
    assert stats.approx_kl.item() == pytest.approx((1 - math.log(2)) / 2)
    loss.backward()
    # d/dlogp_t of -A * sg[s] * exp(logp_t - sg[logp_t]) / 2 = s / 2 = 0.70711 at both real tokens
    assert logp.grad is not None
    assert logp.grad[0, :2].tolist() == pytest.approx([math.sqrt(2) / 2] * 2)
    assert logp.grad[0, 2].item() == 0.0
    # token level on the same data: ratios [2, 1]: max(2, 1.3) = 2 and max(1, 1) = 1 -> (2 + 1) / 2 = 1.5,
    # gradient [2 / 2, 1 / 2]
    logp_t = logp.detach().clone().requires_grad_(True)
    loss_t, _ = policy_loss(logp_t, old, adv, mask, dual_clip=None)
    loss_t.backward()
    assert loss_t.item() == pytest.approx(1.5)
    assert logp_t.grad is not None and logp_t.grad[0, :2].tolist() == pytest.approx([1.0, 0.5])


def test_gspo_clips_whole_sequence() -> None:
    # A = +1 and s = sqrt(2) > 1.3: every token of the sequence is clipped: loss -1.3, zero gradient,
    # although token 1 alone (ratio 1) would not be clipped
    logp = torch.tensor([[math.log(2.0), 0.0]], dtype=F64, requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(1, 2, dtype=F64), torch.ones(1, dtype=F64), torch.ones(1, 2),
                              ratio_level="sequence")  # fmt: skip
    loss.backward()
    assert loss.item() == pytest.approx(-1.3)
    assert stats.clip_frac_high.item() == 1.0
    assert logp.grad is not None and logp.grad.abs().max().item() == 0.0


def _gspo_reference(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    *,
    cl: float,
    ch: float,
    c: float | None,
    agg: str,
    max_len: float,
) -> torch.Tensor:
    """GSPO's sequence-level objective, one sequence at a time, gradient through s_i = exp(mean log-ratio)."""
    b = logp.shape[0]
    n_tok = int(mask.sum())
    total = logp.new_zeros(())
    for i in range(b):
        idx = mask[i].nonzero()[:, 0]
        n = len(idx)
        if n == 0:
            continue
        s = torch.exp((logp[i, idx] - old[i, idx]).mean())
        a = adv[i]
        seq_loss = torch.maximum(-a * s, -a * s.clamp(1 - cl, 1 + ch))
        if c is not None and a < 0:
            seq_loss = torch.minimum(seq_loss, -a * c)
        # every token of the sequence carries seq_loss; the aggregation weighs them
        if agg == "token_mean":
            total = total + seq_loss * n / n_tok
        elif agg == "seq_mean_token_mean":
            total = total + seq_loss / b
        else:
            total = total + seq_loss * n / max_len / b
    return total


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    b=st.integers(1, 4),
    t=st.integers(1, 6),
    agg=st.sampled_from(AGGS),
    dual=st.sampled_from([None, 1.5, 3.0]),
)
def test_gspo_matches_sequence_level_reference_value_and_gradient(
    seed: int, b: int, t: int, agg: str, dual: float | None
) -> None:
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(b, t, generator=g, dtype=F64) * 2
    old = base + 0.5 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    logp = base.clone().requires_grad_(True)
    got, _ = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual, ratio_level="sequence", max_len=8)
    got.backward()
    ref_logp = base.clone().requires_grad_(True)
    want = _gspo_reference(ref_logp, old, adv, mask, cl=0.2, ch=0.3, c=dual, agg=agg, max_len=8)
    want.backward()
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    assert logp.grad is not None and ref_logp.grad is not None
    assert torch.allclose(logp.grad, ref_logp.grad, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), agg=st.sampled_from(AGGS))
def test_gspo_equals_token_level_when_each_row_has_one_ratio(seed: int, agg: str) -> None:
    # old = logp - c_b: every token of row b has log-ratio c_b, so s_b = exp(c_b) = each token's ratio
    g = torch.Generator().manual_seed(seed)
    base = -torch.rand(3, 5, generator=g, dtype=F64)
    old = base - 0.4 * torch.randn(3, 1, generator=g, dtype=F64)
    adv, mask = torch.randn(3, generator=g, dtype=F64), torch.rand(3, 5, generator=g) > 0.3
    grads = []
    for level in RATIO_LEVELS:
        logp = base.clone().requires_grad_(True)
        loss, _ = policy_loss(logp, old, adv, mask, agg=agg, ratio_level=level)
        loss.backward()
        grads.append((loss.item(), logp.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-12)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), agg=st.sampled_from(AGGS))
def test_gspo_masked_tokens_get_zero_gradient_even_with_nan_inf(seed: int, agg: str) -> None:
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(3, 6, generator=g) > 0.4
    mask[:, 0] = True
    poison = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, (3, 6), generator=g)]
    logp = torch.where(mask, -torch.rand(3, 6, generator=g), poison).requires_grad_(True)
    old = torch.where(mask, -torch.rand(3, 6, generator=g), poison)
    loss, stats = policy_loss(logp, old, torch.randn(3, generator=g), mask, agg=agg, ratio_level="sequence")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(stats.ratio_max) and torch.isfinite(stats.approx_kl)
    assert logp.grad is not None and bool((logp.grad[~mask] == 0).all())
    assert bool(torch.isfinite(logp.grad).all())


# ---- importance-sampling weights ------------------------------------------------------------------------


def test_is_weights_hand_worked() -> None:
    # two tokens, ratio 1, A = +1: pg = -1 each; weights [0.5, 2] -> (-0.5 - 2) / 2 = -1.25
    logp = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    w = torch.tensor([[0.5, 2.0]], dtype=F64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2, dtype=F64), torch.ones(1, dtype=F64), torch.ones(1, 2),
                          is_weights=w)  # fmt: skip
    assert loss.item() == pytest.approx(-1.25)
    loss.backward()
    # gradient -A r w / N = [-0.25, -1.0]; no gradient flows into the weights
    assert logp.grad is not None and logp.grad[0].tolist() == pytest.approx([-0.25, -1.0])
    assert w.grad is None
    # per-sequence weights [B] broadcast over the tokens: w = 3 -> -3
    loss_b, _ = policy_loss(logp.detach(), torch.zeros(1, 2, dtype=F64), torch.ones(1, dtype=F64),
                            torch.ones(1, 2), is_weights=torch.tensor([3.0], dtype=F64))  # fmt: skip
    assert loss_b.item() == pytest.approx(-3.0)


def test_is_weights_validation() -> None:
    logp, m = torch.zeros(1, 2), torch.tensor([[True, False]])
    # anything goes off the mask (NaN, negative)
    policy_loss(logp, logp, torch.ones(1), m, is_weights=torch.tensor([[1.0, math.nan]]))
    policy_loss(logp, logp, torch.ones(1), m, is_weights=torch.tensor([[1.0, -5.0]]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        policy_loss(logp, logp, torch.ones(1), m, is_weights=torch.tensor([[-1.0, 1.0]]))
    with pytest.raises(ValueError, match="finite and >= 0"):
        policy_loss(logp, logp, torch.ones(1), m, is_weights=torch.tensor([[math.inf, 1.0]]))
    with pytest.raises(ValueError, match="is_weights must be"):
        policy_loss(logp, logp, torch.ones(1), m, is_weights=torch.ones(2, 2))


def _weighted_loop(
    logp: list[list[float]],
    old: list[list[float]],
    adv: list[float],
    mask: list[list[bool]],
    w: list[list[float]],
    *,
    c: float | None,
    agg: str,
) -> float:
    """Per-token weighted PPO loss from the formulas, python scalars (clip 0.2 / 0.3)."""
    sums, counts = [], []
    for i, row in enumerate(logp):
        s, n = 0.0, 0
        for j, lp in enumerate(row):
            if not mask[i][j]:
                continue
            r, a = math.exp(lp - old[i][j]), adv[i]
            loss = max(-a * r, -a * min(max(r, 0.8), 1.3))
            if c is not None and a < 0:
                loss = min(loss, -a * c)
            s, n = s + w[i][j] * loss, n + 1
        sums.append(s)
        counts.append(n)
    if agg == "token_mean":
        return sum(sums) / max(sum(counts), 1)
    if agg == "seq_mean_token_mean":
        return sum(s / max(n, 1) for s, n in zip(sums, counts)) / len(logp)
    return sum(s / len(logp[0]) for s in sums) / len(logp)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 100_000), agg=st.sampled_from(AGGS), dual=st.sampled_from([None, 3.0]))
def test_is_weighted_loss_matches_python_loop(seed: int, agg: str, dual: float | None) -> None:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(3, 4, generator=g, dtype=F64) * 2
    old = logp + 0.6 * torch.randn(3, 4, generator=g, dtype=F64)
    adv, mask = torch.randn(3, generator=g, dtype=F64), torch.rand(3, 4, generator=g) > 0.3
    w = torch.rand(3, 4, generator=g, dtype=F64) * 3
    got, _ = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual, is_weights=w)
    want = _weighted_loop(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), w.tolist(), c=dual, agg=agg)
    assert got.item() == pytest.approx(want, abs=1e-12)
    unweighted, _ = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual)
    ones, _ = policy_loss(logp, old, adv, mask, agg=agg, dual_clip=dual, is_weights=torch.ones(3, 4, dtype=F64))
    assert ones.item() == unweighted.item()


# ---- truncated completions ------------------------------------------------------------------------------


def test_truncation_mask_zeroes_unfinished_rows() -> None:
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    finished = torch.tensor([True, False, True])
    assert truncation_mask(mask, finished).tolist() == [[True, True, False], [False] * 3, [True, False, False]]
    with pytest.raises(ValueError, match="finished must be \\[B\\]"):
        truncation_mask(mask, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        truncation_mask(mask, torch.ones(3))


def test_truncated_response_gets_no_gradient() -> None:
    # row 1 hit the budget: with the truncation mask its tokens get exactly zero gradient and leave the
    # token-mean denominator: loss = (-1 * 1 * 2 tokens) / 2 = -1 (A = +1, ratio 1 for row 0)
    logp = torch.zeros(2, 2, dtype=F64, requires_grad=True)
    mask = truncation_mask(torch.ones(2, 2), torch.tensor([True, False]))
    loss, _ = policy_loss(logp, torch.zeros(2, 2, dtype=F64), torch.tensor([1.0, 5.0], dtype=F64), mask)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert logp.grad is not None and logp.grad[1].tolist() == [0.0, 0.0] and logp.grad[0].abs().min() > 0


# ---- Dr.GRPO's constant -----------------------------------------------------------------------------


def test_dr_grpo_constant_is_independent_of_batch_padding() -> None:
    # the same two completions (3 and 1 tokens) padded to width 5 on one rank and 9 on another
    g = torch.Generator().manual_seed(0)
    logp5 = torch.full((2, 5), math.nan, dtype=F64)
    logp5[0, :3], logp5[1, :1] = -torch.rand(3, generator=g, dtype=F64), -torch.rand(1, generator=g, dtype=F64)
    old5 = torch.where(torch.isnan(logp5), logp5, logp5 + 0.1)
    mask5 = ~torch.isnan(logp5)
    pad = torch.full((2, 4), math.nan, dtype=F64)
    logp9, old9, mask9 = torch.cat([logp5, pad], 1), torch.cat([old5, pad], 1), torch.cat([mask5, pad == 0], 1)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    kw = {"agg": "seq_mean_token_sum_norm", "max_len": 16}
    a = logp5.clone().requires_grad_(True)
    b = logp9.clone().requires_grad_(True)
    la, _ = policy_loss(a, old5, adv, mask5, **kw)
    lb, _ = policy_loss(b, old9, adv, mask9, **kw)
    la.backward()
    lb.backward()
    assert la.item() == lb.item()
    assert a.grad is not None and b.grad is not None and torch.equal(a.grad[:, :5], b.grad[:, :5])
    # hand-worked: ratio exp(-0.1) = 0.904837 in [0.8, 1.3]; row sums -1 * 0.904837 * 3 and
    # +2 * 0.904837 * 1 -> (-2.714512 + 1.809675) / 16 / 2 = -0.028276
    r = math.exp(-0.1)
    assert la.item() == pytest.approx((-3 * r + 2 * r) / 16 / 2)
    # the default constant (the padded width T) is what makes the two ranks disagree: 5 vs 9
    d5, _ = policy_loss(logp5, old5, adv, mask5, agg="seq_mean_token_sum_norm")
    d9, _ = policy_loss(logp9, old9, adv, mask9, agg="seq_mean_token_sum_norm")
    assert d5.item() == pytest.approx(d9.item() * 9 / 5) and d5.item() != pytest.approx(d9.item())
