"""The PPO update driven without a Trainer, on the real tiny model (training/ppo.py)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diva_lightning.models.policy import PolicyBundle
from diva_lightning.training.config import LossConfig
from diva_lightning.training.ppo import PPOUpdate, UpdateBatch
from tests.helpers.update_hooks import RecordingHooks, small_round

N = 8


@pytest.fixture(scope="module")
def setup(tiny_policy_dir: str) -> tuple[PolicyBundle, dict[str, Tensor], object]:
    return small_round(tiny_policy_dir)


def _batch(roll: object, *, with_old: bool) -> UpdateBatch:
    g = torch.Generator().manual_seed(1)
    mask = roll.completion_mask.bool()  # type: ignore[attr-defined]
    old = None
    if with_old:
        old = -torch.rand(mask.shape, generator=g) * mask  # some other sampling policy: ratios != 1
    return UpdateBatch(advantages=torch.randn(N, generator=g), mask=mask, old_logp=old)


@pytest.mark.parametrize(("agg", "ratio_level"), [
    ("token_mean", "token"), ("seq_mean_token_mean", "token"), ("seq_mean_token_sum_norm", "token"),
    ("token_mean", "sequence"),
])
def test_one_micro_batch_of_8_equals_8_of_1(setup: tuple, agg: str, ratio_level: str) -> None:
    """Gradient accumulation invariance (TRL's tests/invariant), through the real tiny model."""
    bundle, inputs, roll = setup
    loss = LossConfig(agg=agg, ratio_level=ratio_level, entropy_coef=0.01)
    grads = []
    for micro in (8, 1):
        hooks = RecordingHooks(bundle, inputs, roll)
        PPOUpdate(loss, micro_batch_size=micro, max_len=6).run(_batch(roll, with_old=True), hooks,
                                                               generator=torch.Generator().manual_seed(0))
        assert len(hooks.steps) == 1 and len(hooks.forwards) == N // micro
        grads.append(hooks.steps[0])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_mini_batches_take_one_step_each_and_need_old_logps(setup: tuple) -> None:
    bundle, inputs, roll = setup
    update = PPOUpdate(LossConfig(), epochs=2, mini_batch_size=4)
    assert update.steps_per_round(N) == 4 and not update.single_step(N)
    hooks = RecordingHooks(bundle, inputs, roll)
    update.run(_batch(roll, with_old=True), hooks, generator=torch.Generator().manual_seed(0))
    assert len(hooks.steps) == 4
    # old = current is REINFORCE on stale samples after the first step: refused, not silently done
    with pytest.raises(ValueError, match="old log-probs are required: this round takes 4 optimizer steps"):
        update.run(_batch(roll, with_old=False), hooks, generator=torch.Generator().manual_seed(0))


def test_dr_grpo_constant_is_the_budget_not_the_longest_response(setup: tuple) -> None:
    """seq_mean_token_sum_norm divides by max_len: a round whose responses are all short gets the same scale."""
    bundle, inputs, roll = setup
    stats = []
    for max_len in (6, 12):
        hooks = RecordingHooks(bundle, inputs, roll)
        stats.append(PPOUpdate(LossConfig(agg="seq_mean_token_sum_norm"), max_len=max_len).run(
            _batch(roll, with_old=True), hooks, generator=torch.Generator().manual_seed(0)))
    assert stats[0]["loss/policy"] == pytest.approx(2 * stats[1]["loss/policy"], rel=1e-5)


def test_bad_settings_are_listed_together() -> None:
    with pytest.raises(ValueError) as err:
        PPOUpdate(LossConfig(agg="mean", ratio_level="word"), epochs=0, micro_batch_size=0)
    for part in ("loss.agg", "loss.ratio_level", "ppo_epochs", "micro_batch_size"):
        assert part in str(err.value)
