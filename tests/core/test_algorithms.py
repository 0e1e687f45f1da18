"""The injectable estimators of diva_lightning.training.estimators: the official RRB threshold knobs and validation."""

from __future__ import annotations

import math

import pytest
import torch

from diva_lightning.core.advantage import DivaSettings, diva_advantages
from diva_lightning.training.estimators import DivaAdvantage, GRPOAdvantage

F64 = torch.float64


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # prompt group 0: rewards [0.1, 0.0] (all below 0.15); group 1: [1.0, 0.0]; one family each
    rewards = torch.tensor([0.1, 0.0, 1.0, 0.0], dtype=F64)
    ids = torch.tensor([0, 0, 1, 1])
    return rewards, ids, ids, torch.full((4,), 5.0, dtype=F64)


def test_rrb_threshold_and_factor_hand_worked() -> None:
    # local term only, no batch norm or weighting: each group's z-score is +-0.05 / (std 0.0707 + eps) or
    # +-0.5 / (0.7071 + eps), i.e. +-0.70711 in both groups
    kw = {"global_weight": 0.0, "batch_norm": False, "difficulty_weighting": False, "rrb": "threshold"}
    z = 1 / math.sqrt(2)
    official = DivaAdvantage(**kw)(*_batch())  # type: ignore[arg-type]
    # group 0 is all below 0.15 -> x 0.1; group 1 is not
    assert official.tolist() == pytest.approx([0.1 * z, -0.1 * z, z, -z], rel=1e-4)
    # threshold 0.05: group 0's max 0.1 is not below it -> unscaled
    low = DivaAdvantage(**kw, rrb_threshold=0.05)(*_batch())  # type: ignore[arg-type]
    assert low.tolist() == pytest.approx([z, -z, z, -z], rel=1e-4)
    # factor 0.5 -> group 0 halved
    half = DivaAdvantage(**kw, rrb_factor=0.5)(*_batch())  # type: ignore[arg-type]
    assert half.tolist() == pytest.approx([0.5 * z, -0.5 * z, z, -z], rel=1e-4)


def test_estimator_equals_the_core_function_with_every_knob() -> None:
    rewards, pids, fids, diff = _batch()
    est = DivaAdvantage(k=0.2, rrb="threshold", rrb_threshold=0.5, rrb_factor=0.3, weight_terms="both")
    settings = DivaSettings(k=0.2, rrb="threshold", rrb_threshold=0.5, rrb_factor=0.3, weight_terms="both")
    want = diva_advantages(rewards, pids, fids, diff, settings)
    assert torch.equal(est(rewards, pids, fids, diff), want)
    assert "rrb_threshold=0.5" in repr(est) and "rrb_factor=0.3" in repr(est)


def test_validation_lists_every_problem() -> None:
    with pytest.raises(ValueError, match="weight_terms.*rrb must.*r_max.*rrb_factor"):
        DivaAdvantage(weight_terms="local", rrb="clip", r_max=0.0, rrb_factor=-1.0)
    with pytest.raises(ValueError, match="scale must be one of"):
        GRPOAdvantage(scale="std")
