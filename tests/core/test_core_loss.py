"""Policy loss: hand-worked values, masking, gradient accumulation, and a per-token python reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.loss import aggregate, policy_loss

F64 = torch.float64


def test_single_token_hand_worked_clip_branches() -> None:
    # old_logp = 0; logp = log(ratio). clip range [0.8, 1.3], dual clip 3.
    ratios = [1.5, 1.5, 0.5, 0.5, 5.0, 1.1]
    advs = [1.0, -1.0, 1.0, -1.0, -1.0, 2.0]
    # A=+1, r=1.5: max(-1.5, -1.3) = -1.3 (clipped high)
    # A=-1, r=1.5: max(1.5, 1.3) = 1.5 (unclipped, pessimistic)
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5
    # A=-1, r=0.5: max(0.5, 0.8) = 0.8 (clipped low)
    # A=-1, r=5.0: max(5, 1.3) = 5 -> dual clip min(5, 3) = 3
    # A=+2, r=1.1: max(-2.2, -2.2) = -2.2
    expected = [-1.3, 1.5, -0.5, 0.8, 3.0, -2.2]
    logp = torch.tensor([[math.log(r)] for r in ratios], dtype=F64, requires_grad=True)
    old = torch.zeros(6, 1, dtype=F64)
    mask = torch.ones(6, 1, dtype=torch.bool)
    loss, stats = policy_loss(logp, old, torch.tensor(advs, dtype=F64), mask)
    assert loss.item() == pytest.approx(sum(expected) / 6)
    # clip_frac_low: A<0 and r<0.8 -> token 3 (1/6); clip_frac_high: A>0 and r>1.3 -> token 0 (1/6)
    assert stats.clip_frac_low.item() == pytest.approx(1 / 6)
    assert stats.clip_frac_high.item() == pytest.approx(1 / 6)
    assert stats.dual_clip_frac.item() == pytest.approx(1 / 6)
    assert stats.ratio_max.item() == pytest.approx(5.0)
    assert stats.ratio_mean.item() == pytest.approx(sum(ratios) / 6)
    loss.backward()
    # gradient d(-A r)/d logp = -A r / 6 on unclipped tokens, 0 on clipped ones:
    # tok1: -(-1)(1.5)/6 = .25, tok2: -(1)(.5)/6, tok5: -(2)(1.1)/6; tokens 0, 3, 4 are clipped
    assert logp.grad is not None
    want = [0.0, 0.25, -0.5 / 6, 0.0, 0.0, -2.2 / 6]
    assert logp.grad[:, 0].tolist() == pytest.approx(want)


def test_dual_clip_off_and_validation() -> None:
    logp = torch.tensor([[math.log(5.0)]], dtype=F64)
    loss, _ = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.tensor([-1.0], dtype=F64),
                          torch.ones(1, 1, dtype=torch.bool), dual_clip=None)  # fmt: skip
    assert loss.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        policy_loss(logp, logp, torch.tensor([1.0]), torch.ones(1, 1), dual_clip=0.5)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, logp, torch.ones(3), torch.ones(1, 1))
    with pytest.raises(ValueError, match="old_logp shape"):
        policy_loss(logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 1))
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, logp, torch.ones(1), torch.ones(1, 1), agg="sum")


def test_aggregations_hand_worked() -> None:
    # values [[1, 2, 3, x], [4, x, x, x]] with x masked out (and NaN/inf there on purpose)
    v = torch.tensor([[1.0, 2.0, 3.0, math.nan], [4.0, math.inf, -math.inf, math.nan]])
    m = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # token_mean: (1+2+3+4)/4 = 2.5
    assert aggregate(v, m, "token_mean").item() == pytest.approx(2.5)
    # seq_mean_token_mean: mean(6/3, 4/1) = 3
    assert aggregate(v, m, "seq_mean_token_mean").item() == pytest.approx(3.0)
    # seq_mean_token_sum_norm (T = 4): mean(6/4, 4/4) = 1.25
    assert aggregate(v, m, "seq_mean_token_sum_norm").item() == pytest.approx(1.25)
    assert aggregate(v, m, "seq_mean_token_sum_norm", max_len=8).item() == pytest.approx(0.625)
    assert aggregate(v, m, "token_mean", num_tokens=10).item() == pytest.approx(1.0)


def test_kl_and_entropy_terms_hand_worked() -> None:
    # one token, logp = old = 0 (ratio 1, A=0 -> pg 0); ref = -1 -> logp - ref = 1
    logp = torch.zeros(1, 1, dtype=F64)
    ref = -torch.ones(1, 1, dtype=F64)
    ent = torch.full((1, 1), 2.0, dtype=F64)
    m = torch.ones(1, 1, dtype=torch.bool)
    adv = torch.zeros(1, dtype=F64)
    # k1 = 1; k3 = exp(ref - logp) - (ref - logp) - 1 = e^-1 + 1 - 1 = e^-1
    loss, s = policy_loss(
        logp, logp, adv, m, ref_logp=ref, kl_coef=0.5, kl_type="k1", entropy=ent, entropy_coef=0.1
    )
    assert s.kl is not None and s.kl.item() == pytest.approx(1.0)
    assert s.entropy is not None and s.entropy.item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.5 * 1.0 - 0.1 * 2.0)
    loss3, s3 = policy_loss(logp, logp, adv, m, ref_logp=ref, kl_coef=1.0, kl_type="low_var_kl")
    assert (
        s3.kl is not None
        and s3.kl.item() == pytest.approx(math.exp(-1))
        and loss3.item() == pytest.approx(math.exp(-1))
    )
    # without ref_logp / entropy the stats say None
    _, s0 = policy_loss(logp, logp, adv, m)
    assert s0.kl is None and s0.entropy is None


def test_approx_kl_hand_worked() -> None:
    # ratio 2: (2 - 1) - log 2 = 0.3069
    logp = torch.tensor([[math.log(2.0)]], dtype=F64)
    _, s = policy_loss(logp, torch.zeros(1, 1, dtype=F64), torch.ones(1, dtype=F64), torch.ones(1, 1))
    assert s.approx_kl.item() == pytest.approx(1 - math.log(2))


# ---- masking --------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    agg=st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]),
    kl_type=st.sampled_from(["k1", "k3"]),
)
def test_masked_tokens_get_exactly_zero_gradient_even_with_nan_inf(seed: int, agg: str, kl_type: str) -> None:
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 6
    mask = torch.rand(b, t, generator=g) > 0.4
    mask[:, 0] = True
    poison = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, (b, t), generator=g)]
    logp = torch.where(mask, -torch.rand(b, t, generator=g) * 3, poison).requires_grad_(True)
    old = torch.where(mask, -torch.rand(b, t, generator=g) * 3, poison)
    ref = torch.where(mask, -torch.rand(b, t, generator=g) * 3, poison)
    ent = torch.where(mask, torch.rand(b, t, generator=g), poison).requires_grad_(True)
    adv = torch.randn(b, t, generator=g)
    loss, stats = policy_loss(logp, old, adv, mask, agg=agg, ref_logp=ref, kl_coef=0.1, kl_type=kl_type,
                              entropy=ent, entropy_coef=0.01)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss)
    assert logp.grad is not None and ent.grad is not None
    assert bool((logp.grad[~mask] == 0).all()) and bool(torch.isfinite(logp.grad).all())
    assert bool((ent.grad[~mask] == 0).all())
    assert all(torch.isfinite(x) for x in (stats.pg_loss, stats.ratio_mean, stats.ratio_max, stats.approx_kl))


def test_huge_log_ratio_does_not_give_nan_gradient() -> None:
    # ratio = e^100 with A > 0 is clipped; without the log-ratio clamp, 0 * inf would make the grad NaN
    logp = torch.tensor([[100.0, 0.0]], requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.ones(1), torch.ones(1, 2))
    loss.backward()
    assert logp.grad is not None and bool(torch.isfinite(logp.grad).all())


# ---- gradient accumulation invariant ----------------------------------------------------------------


def test_token_mean_accumulation_1x8_equals_8x1() -> None:
    g = torch.Generator().manual_seed(0)
    b, t = 8, 7
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [8, 7] ragged completions
    logp_data = -torch.rand(b, t, generator=g, dtype=F64) * 2
    old = logp_data + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, generator=g, dtype=F64)

    full_logp = logp_data.clone().requires_grad_(True)
    full, _ = policy_loss(full_logp, old, adv, mask)
    full.backward()

    micro_logp = logp_data.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    n_tok = int(mask.sum())
    for i in range(b):
        part, _ = policy_loss(
            micro_logp[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1], num_tokens=n_tok
        )
        part.backward()
        total = total + part.detach()
    assert total.item() == pytest.approx(full.item(), abs=1e-12)
    assert full_logp.grad is not None and micro_logp.grad is not None
    assert torch.allclose(micro_logp.grad, full_logp.grad, atol=1e-12)
    # without num_tokens the sum of micro-batch means is a different (length-biased) quantity
    naive = sum(
        policy_loss(logp_data[i : i + 1], old[i : i + 1], adv[i : i + 1], mask[i : i + 1])[0].item()
        for i in range(b)
    )
    assert naive / b != pytest.approx(full.item(), abs=1e-6)


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_seq_aggregations_accumulate_with_num_seqs(agg: str) -> None:
    g = torch.Generator().manual_seed(1)
    mask = torch.arange(5)[None, :] < torch.tensor([1, 3, 5, 2])[:, None]
    logp, old, adv = (
        -torch.rand(4, 5, generator=g, dtype=F64),
        -torch.rand(4, 5, generator=g, dtype=F64),
        torch.randn(4, generator=g, dtype=F64),
    )
    full, _ = policy_loss(logp, old, adv, mask, agg=agg)
    parts = [
        policy_loss(logp[i : i + 2], old[i : i + 2], adv[i : i + 2], mask[i : i + 2], agg=agg, num_seqs=4)[0]
        for i in (0, 2)
    ]
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), abs=1e-12)


# ---- independent reference --------------------------------------------------------------------------


def _loss_loop(
    logp: list[list[float]],
    old: list[list[float]],
    adv: list[float],
    mask: list[list[bool]],
    *,
    cl: float,
    ch: float,
    c: float | None,
    agg: str,
) -> float:
    """PPO per-token loss from the formulas, python scalars, explicit loops."""
    per_seq_sum, per_seq_n, total, n_tok = [], [], 0.0, 0
    for i, row in enumerate(logp):
        s, n = 0.0, 0
        for j, lp in enumerate(row):
            if not mask[i][j]:
                continue
            r = math.exp(lp - old[i][j])
            a = adv[i]
            loss = max(-a * r, -a * min(max(r, 1 - cl), 1 + ch))
            if c is not None and a < 0:
                loss = min(loss, -a * c)
            s, n = s + loss, n + 1
        per_seq_sum.append(s)
        per_seq_n.append(n)
        total, n_tok = total + s, n_tok + n
    if agg == "token_mean":
        return total / max(n_tok, 1)
    if agg == "seq_mean_token_mean":
        return sum(s / max(n, 1) for s, n in zip(per_seq_sum, per_seq_n)) / len(logp)
    return sum(s / len(logp[0]) for s in per_seq_sum) / len(logp)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    b=st.integers(1, 4),
    t=st.integers(1, 6),
    agg=st.sampled_from(["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]),
    dual=st.sampled_from([None, 1.5, 3.0]),
    cl=st.sampled_from([0.1, 0.2]),
    ch=st.sampled_from([0.2, 0.28]),
)
def test_policy_loss_matches_python_loop_reference(
    seed: int, b: int, t: int, agg: str, dual: float | None, cl: float, ch: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=F64) * 2
    old = logp + 0.6 * torch.randn(b, t, generator=g, dtype=F64)  # ratios spread over every branch
    adv = torch.randn(b, generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) > 0.3
    got, _ = policy_loss(logp, old, adv, mask, clip_low=cl, clip_high=ch, dual_clip=dual, agg=agg)
    want = _loss_loop(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), cl=cl, ch=ch, c=dual, agg=agg)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_per_token_advantages_accepted() -> None:
    logp = torch.zeros(2, 3, dtype=F64)
    adv_seq = torch.tensor([1.0, -2.0], dtype=F64)
    a, _ = policy_loss(logp, logp, adv_seq, torch.ones(2, 3))
    b, _ = policy_loss(logp, logp, adv_seq[:, None].expand(2, 3), torch.ones(2, 3))
    # ratio 1 everywhere: loss = -mean(A) over tokens = -(3*1 + 3*(-2)) / 6 = 0.5
    assert a.item() == b.item() == pytest.approx(0.5)
