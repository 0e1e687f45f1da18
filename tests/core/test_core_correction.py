"""Engine/trainer importance-sampling correction: hand-worked values, properties, a python-loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.correction import IS_LEVELS, IS_MODES, importance_weights
from diva_lightning.core.loss import policy_loss

F64 = torch.float64


def _token_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # one row, three real tokens: log(trainer / engine) = [log 4, log 0.5, 0] -> ratios [4, 0.5, 1];
    # a padding token holds NaN in both
    trainer = torch.tensor([[math.log(4.0), math.log(0.5), 0.0, math.nan]], dtype=F64)
    engine = torch.tensor([[0.0, 0.0, 0.0, math.nan]], dtype=F64)
    return trainer, engine, torch.tensor([[True, True, True, False]])


def test_token_truncate_hand_worked() -> None:
    w, s = importance_weights(*_token_case(), level="token", mode="truncate", cap=3.0)
    # min(rho, 3) = [3, 0.5, 1], 0 on padding
    assert w.tolist() == [[3.0, 0.5, 1.0, 0.0]]
    assert s.ratio_mean.item() == pytest.approx((4 + 0.5 + 1) / 3)  # 1.8333
    assert (s.ratio_min.item(), s.ratio_max.item()) == pytest.approx((0.5, 4.0))
    assert s.weight_mean.item() == pytest.approx(4.5 / 3)  # (3 + 0.5 + 1) / 3
    assert (s.frac_truncated.item(), s.frac_masked.item()) == pytest.approx((1 / 3, 0.0))
    # k1 KL(engine || trainer) = mean(engine - trainer) = -(log 4 + log 0.5 + 0) / 3 = -log(2) / 3
    assert s.kl.item() == pytest.approx(-math.log(2) / 3)
    # k3 = mean(r - 1 - log r) = ((4 - 1 - log 4) + (0.5 - 1 - log 0.5) + 0) / 3 = (1.61371 + 0.19315) / 3
    assert s.k3_kl.item() == pytest.approx((3 - math.log(4) - 0.5 + math.log(2)) / 3)
    # |trainer - engine| = [log 4, log 2, 0]
    assert s.logp_diff_mean.item() == pytest.approx(3 * math.log(2) / 3)
    assert s.logp_diff_max.item() == pytest.approx(math.log(4))


def test_token_mask_hand_worked() -> None:
    w, s = importance_weights(*_token_case(), level="token", mode="mask", cap=3.0)
    # rho > 3 -> 0, else rho: [0, 0.5, 1]; no lower bound (TRL): 0.5 is kept
    assert w.tolist() == [[0.0, 0.5, 1.0, 0.0]]
    assert (s.frac_truncated.item(), s.frac_masked.item()) == pytest.approx((0.0, 1 / 3))
    assert s.weight_mean.item() == pytest.approx(1.5 / 3)


def test_sequence_levels_hand_worked() -> None:
    # row 0: log-ratios [log 2, log 2] -> rho = exp(log 2 + log 2) = 4; row 1: [log 0.5, pad] -> 0.5
    trainer = torch.tensor([[math.log(2.0), math.log(2.0)], [math.log(0.5), math.inf]], dtype=F64)
    engine = torch.tensor([[0.0, 0.0], [0.0, math.nan]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    w, s = importance_weights(trainer, engine, mask, level="sequence", mode="truncate", cap=3.0)
    assert w.tolist() == [[3.0, 3.0], [0.5, 0.0]]
    # sequence statistics: ratios [4, 0.5] -> mean 2.25, one of two sequences truncated
    assert s.ratio_mean.item() == pytest.approx(2.25) and s.frac_truncated.item() == pytest.approx(0.5)
    wm, sm = importance_weights(trainer, engine, mask, level="sequence", mode="mask", cap=3.0)
    assert wm.tolist() == [[0.0, 0.0], [0.5, 0.0]]
    assert sm.frac_masked.item() == pytest.approx(0.5) and sm.weight_mean.item() == pytest.approx(0.25)
    # per-token statistics stay per token: kl = -(log 2 + log 2 + log 0.5) / 3 = -log(2) / 3
    assert sm.kl.item() == pytest.approx(-math.log(2) / 3)


def test_minus_inf_engine_logp_gives_finite_capped_weight() -> None:
    w, s = importance_weights(torch.zeros(1, 1), torch.tensor([[-math.inf]]), torch.ones(1, 1), cap=2.0)
    assert w.item() == 2.0 and math.isfinite(s.ratio_max.item()) and math.isfinite(s.kl.item())


def test_validation_and_metric_names() -> None:
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="NaN on 1 masked-in"):
        importance_weights(torch.tensor([[0.0, math.nan]]), z, torch.ones(1, 2))
    with pytest.raises(ValueError, match="level"):
        importance_weights(z, z, torch.ones(1, 2), level="geometric")
    with pytest.raises(ValueError, match="mode"):
        importance_weights(z, z, torch.ones(1, 2), mode="clip")
    with pytest.raises(ValueError, match="cap"):
        importance_weights(z, z, torch.ones(1, 2), cap=0.0)
    with pytest.raises(ValueError, match="engine_logp shape"):
        importance_weights(z, torch.zeros(2, 2), torch.ones(1, 2))
    _, s = importance_weights(z, z, torch.ones(1, 2))
    metrics = s.metrics()
    assert set(metrics) >= {"rollout_correction/ratio_mean", "rollout_correction/ratio_max",
                            "rollout_correction/kl", "rollout_correction/frac_masked"}  # fmt: skip
    assert metrics["rollout_correction/ratio_mean"] == 1.0 and metrics["rollout_correction/kl"] == 0.0
    # an empty mask gives zeros, not NaN
    w0, s0 = importance_weights(z, z, torch.zeros(1, 2, dtype=torch.bool), level="sequence")
    assert w0.abs().sum() == 0 and all(math.isfinite(v) for v in s0.metrics().values())
    # low precision inputs are promoted to float32
    wb, _ = importance_weights(z.bfloat16(), z.bfloat16(), torch.ones(1, 2))
    assert wb.dtype == torch.float32


def _reference(
    trainer: list[list[float]], engine: list[list[float]], mask: list[list[bool]], level: str, mode: str, cap: float
) -> list[list[float]]:
    """Weights from the definitions, python scalars."""

    def cut(rho: float) -> float:
        return min(rho, cap) if mode == "truncate" else (rho if rho <= cap else 0.0)

    out = []
    for tr, en, m in zip(trainer, engine, mask):
        if level == "token":
            out.append([cut(math.exp(a - b)) if k else 0.0 for a, b, k in zip(tr, en, m)])
        else:
            w = cut(math.exp(sum(a - b for a, b, k in zip(tr, en, m) if k)))
            out.append([w if k else 0.0 for k in m])
    return out


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 100_000),
    level=st.sampled_from(IS_LEVELS),
    mode=st.sampled_from(IS_MODES),
    cap=st.sampled_from([1.5, 3.0]),
)
def test_weights_match_reference_and_properties(seed: int, level: str, mode: str, cap: float) -> None:
    g = torch.Generator().manual_seed(seed)
    b, t = 3, 5
    mask = torch.rand(b, t, generator=g) > 0.3
    poison = torch.tensor([math.nan, math.inf, -math.inf])[torch.randint(0, 3, (b, t), generator=g)]
    trainer = torch.where(mask, -torch.rand(b, t, generator=g, dtype=F64) * 2, poison.double())
    engine = torch.where(mask, trainer + 0.3 * torch.randn(b, t, generator=g, dtype=F64), poison.double())
    w, s = importance_weights(trainer, engine, mask, level=level, mode=mode, cap=cap)
    want = _reference(trainer.tolist(), engine.tolist(), mask.tolist(), level, mode, cap)
    assert torch.allclose(w, torch.tensor(want, dtype=F64), rtol=1e-12, atol=0)
    # properties: finite everywhere, 0 off the mask, within [0, cap], stats finite, k3 >= 0
    assert bool(torch.isfinite(w).all()) and bool((w[~mask] == 0).all())
    assert bool((w >= 0).all()) and bool((w <= cap).all())
    assert all(math.isfinite(v) for v in s.metrics().values()) and s.k3_kl.item() >= 0
    assert 0.0 <= s.frac_masked.item() <= 1.0 and 0.0 <= s.frac_truncated.item() <= 1.0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), level=st.sampled_from(IS_LEVELS), mode=st.sampled_from(IS_MODES))
def test_identical_log_probs_mean_no_correction(seed: int, level: str, mode: str) -> None:
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(2, 4, generator=g, dtype=F64)
    mask = torch.rand(2, 4, generator=g) > 0.3
    w, s = importance_weights(logp, logp, mask, level=level, mode=mode)
    assert torch.equal(w, mask.to(F64))
    assert s.kl.item() == 0.0 and s.k3_kl.item() == 0.0 and s.frac_masked.item() == s.frac_truncated.item() == 0


def test_weights_feed_policy_loss_without_gradient() -> None:
    # trainer log-probs carry grad (they come from the model): the weights must not pass it on
    trainer = torch.tensor([[math.log(2.0), 0.0]], dtype=F64, requires_grad=True)
    w, _ = importance_weights(trainer, torch.zeros(1, 2, dtype=F64), torch.ones(1, 2))
    assert not w.requires_grad
    logp = torch.zeros(1, 2, dtype=F64, requires_grad=True)
    loss, _ = policy_loss(logp, torch.zeros(1, 2, dtype=F64), torch.ones(1, dtype=F64), torch.ones(1, 2),
                          is_weights=w)  # fmt: skip
    # weights [2, 1], ratio 1, A = 1: (-2 - 1) / 2 = -1.5
    assert loss.item() == pytest.approx(-1.5)
