"""Group statistics of core.metrics: hand-worked values, hypothesis properties, an independent reference."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.metrics import (
    group_has_spread,
    variant_rescue_rate,
    zero_spread_probability,
    zero_std_fraction,
)

# ---- hand-worked ------------------------------------------------------------------------------------


def test_zero_std_fraction_by_hand() -> None:
    # groups 7: (1, 1) no spread; 3: (0, 1) spread; 9: (0.1,) a single response has no spread
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.1])
    ids = torch.tensor([7, 3, 7, 3, 9])
    assert group_has_spread(rewards, ids).tolist() == [True, False, False]  # sorted ids 3, 7, 9
    assert zero_std_fraction(rewards, ids) == pytest.approx(2 / 3)
    assert zero_std_fraction(torch.tensor([]), torch.tensor([], dtype=torch.int64)) == 0.0


def test_variant_rescue_rate_by_hand() -> None:
    # family 0: original (1, 1) stuck, variant (0, 1) -> rescued; family 1: original (0, 1) not stuck;
    # family 2: original (0, 0) stuck, variant (0, 0) -> not rescued. Rate 1/2.
    rewards = torch.tensor([1.0, 1, 0, 1, 0, 1, 1, 1, 0, 0, 0, 0])
    prompts = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])
    family = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    orig = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert variant_rescue_rate(rewards, prompts, family, orig) == pytest.approx(0.5)
    # nothing stuck -> None (no rate to report)
    assert variant_rescue_rate(rewards[4:8], prompts[4:8], family[4:8], orig[4:8]) is None


def test_zero_spread_probability_by_hand() -> None:
    # 0.5**5 * 2 = 1/16; 0.5**10 * 2 = 1/512; 0.9**5 + 0.1**5 = 0.59049 + 0.00001
    got = zero_spread_probability(torch.tensor([0.5, 0.9, 0.0, 1.0], dtype=torch.float64), 5)
    assert got.tolist() == pytest.approx([1 / 16, 0.5905, 1.0, 1.0])
    assert float(zero_spread_probability(0.5, 10)) == pytest.approx(1 / 512)
    with pytest.raises(ValueError, match="n must be"):
        zero_spread_probability(0.5, 0)
    with pytest.raises(ValueError, match=r"p must lie in \[0, 1\]"):
        zero_spread_probability(torch.tensor([0.2, 1.5]), 5)


# ---- properties -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(p=st.floats(0.0, 1.0), n=st.integers(1, 30))
def test_zero_spread_probability_properties(p: float, n: int) -> None:
    p0 = float(zero_spread_probability(p, n))
    assert p0 == pytest.approx(float(zero_spread_probability(1 - p, n)))  # symmetric in p <-> 1 - p
    assert 2.0 ** (1 - n) - 1e-12 <= p0 <= 1.0 + 1e-12  # floor at p = 0.5
    assert float(zero_spread_probability(p, n + 1)) <= p0 + 1e-12  # more responses never raise it


# ---- independent reference --------------------------------------------------------------------------


def test_zero_spread_probability_matches_binomial_and_simulation() -> None:
    rng = random.Random(0)
    for p, n in [(0.3, 5), (0.8, 10), (0.05, 5), (0.5, 3)]:
        binom = math.comb(n, 0) * (1 - p) ** n + math.comb(n, n) * p**n
        assert float(zero_spread_probability(p, n)) == pytest.approx(binom)
        # Monte Carlo: groups of n draws, fraction with all draws equal, against the formula (4 sigma)
        trials = 20000
        groups = [[rng.random() < p for _ in range(n)] for _ in range(trials)]
        rewards = torch.tensor([float(x) for g in groups for x in g])
        ids = torch.arange(trials).repeat_interleave(n)
        sigma = math.sqrt(binom * (1 - binom) / trials)
        assert abs(zero_std_fraction(rewards, ids) - binom) < 4 * sigma + 1e-9
