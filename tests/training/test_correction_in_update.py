"""The rollout correction computed inside the update (issue 25 item 5), on the real tiny model.

In a round of one optimizer step the update takes the old log-probs from its own forward (detached), and computes
the importance weights from them micro-batch by micro-batch (`training.ppo.RoundCorrection`) instead of from a
separate no-grad pass over the round. The loss statistics, gradients and ``rollout_correction/`` metrics must be
those of the old path: weights from `core.correction.importance_weights` on an explicit no-grad pass, given to the
update as ``is_weights``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from diva_lightning.core.correction import importance_weights
from diva_lightning.models.logprobs import completion_logprobs, sequence_lengths
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.training.config import CorrectionConfig, LossConfig
from diva_lightning.training.ppo import PPOUpdate, UpdateBatch
from tests.helpers.update_hooks import RecordingHooks, small_round

N = 8
CAP = 1.5  # low, so that the perturbed engine log-probs push some tokens and sequences over it


@pytest.fixture(scope="module")
def setup(tiny_policy_dir: str) -> tuple[PolicyBundle, dict[str, Tensor], object]:
    return small_round(tiny_policy_dir)


def _mask(roll: object) -> Tensor:
    mask = roll.completion_mask.bool().clone()  # type: ignore[attr-defined]
    mask[5] = False  # a truncated response (mask_truncated_completions): no unit, weight 0
    return mask


def _engine_logp(bundle: PolicyBundle, inputs: dict[str, Tensor], roll: object, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(the trainer's log-probs from a no-grad pass over the round, the engine's: those plus noise)."""
    r = roll
    with torch.no_grad():
        trainer = completion_logprobs(bundle.model, inputs, r.completion_ids, r.completion_mask,  # type: ignore[attr-defined]
                                      prompt_index=r.prompt_index)[0]  # type: ignore[attr-defined]
    noise = torch.randn(trainer.shape, generator=torch.Generator().manual_seed(3)) * 0.8
    engine = torch.where(mask, trainer + noise, torch.full_like(trainer, math.nan))  # off the mask: never read
    return trainer, engine


def _update(packed: bool) -> PPOUpdate:
    loss = LossConfig(entropy_coef=0.01, kl_coef=0.05)
    if packed:
        return PPOUpdate(loss, max_len=6, max_tokens_per_micro_batch=300)
    return PPOUpdate(loss, max_len=6, micro_batch_size=3)


@pytest.mark.parametrize(("level", "mode", "packed"), [
    ("token", "truncate", False), ("token", "mask", False), ("sequence", "truncate", False),
    ("sequence", "mask", False),
    ("token", "mask", True), ("sequence", "truncate", True),  # padding-free, token-budget micro-batches
])
def test_weights_from_the_update_forward_equal_a_separate_pass(setup: tuple, level: str, mode: str,
                                                                packed: bool) -> None:
    bundle, inputs, roll = setup
    mask = _mask(roll)
    trainer, engine = _engine_logp(bundle, inputs, roll, mask)
    g = torch.Generator().manual_seed(1)
    adv = torch.randn(N, generator=g)
    ref = -torch.rand(mask.shape, generator=g) * mask
    layout = {"seq_lens": sequence_lengths(inputs, roll.prompt_index, roll.completion_mask),
              "groups": roll.prompt_index}
    cfg = CorrectionConfig(level=level, mode=mode, cap=CAP)  # type: ignore[arg-type]

    # the old path: weights and statistics from the separate pass, handed to the update
    weights, cstats = importance_weights(trainer, engine, mask, level=level, mode=mode, cap=CAP)  # type: ignore[arg-type]
    over = cstats.frac_truncated if mode == "truncate" else cstats.frac_masked
    assert 0 < float(over) < 1  # some units over the cap, some under
    old_hooks = RecordingHooks(bundle, inputs, roll, packed=packed)
    want = _update(packed).run(UpdateBatch(advantages=adv, mask=mask, ref_logp=ref, is_weights=weights, **layout),
                               old_hooks, generator=torch.Generator())
    want.update(cstats.metrics())

    # the new path: no pass, the weights from each micro-batch's own forward
    hooks = RecordingHooks(bundle, inputs, roll, packed=packed)
    got = _update(packed).run(UpdateBatch(advantages=adv, mask=mask, ref_logp=ref, engine_logp=engine,
                                          correction=cfg, **layout), hooks, generator=torch.Generator())
    assert len(hooks.forwards) > 1 and sorted(r for rows in hooks.forwards for r in rows) == list(range(N))
    assert hooks.forwards == old_hooks.forwards  # the same forwards, nothing else scored
    assert got.keys() == want.keys() and any(k.startswith("rollout_correction/") for k in got)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert hooks.grads.keys() == old_hooks.grads.keys() and hooks.grads
    for name, grad in old_hooks.grads.items():
        scale = float(grad.abs().max())
        assert float((hooks.grads[name] - grad).abs().max()) <= 1e-5 * scale + 1e-9, name


def test_with_old_logps_the_weights_are_computed_before_the_steps(setup: tuple) -> None:
    """Several optimizer steps per round: the caller's old log-probs give the weights (as the re-scored pass did)."""
    bundle, inputs, roll = setup
    mask = _mask(roll)
    trainer, engine = _engine_logp(bundle, inputs, roll, mask)
    weights, cstats = importance_weights(trainer, engine, mask, level="sequence", mode="truncate", cap=CAP)
    update = PPOUpdate(LossConfig(), mini_batch_size=4)
    old_hooks = RecordingHooks(bundle, inputs, roll, packed=False)
    adv = torch.randn(N, generator=torch.Generator().manual_seed(1))
    want = update.run(UpdateBatch(advantages=adv, mask=mask, old_logp=trainer, is_weights=weights), old_hooks,
                      generator=torch.Generator().manual_seed(0))
    want.update(cstats.metrics())
    hooks = RecordingHooks(bundle, inputs, roll, packed=False)
    got = update.run(UpdateBatch(advantages=adv, mask=mask, old_logp=trainer, engine_logp=engine,
                                 correction=CorrectionConfig(level="sequence", mode="truncate", cap=CAP)), hooks,
                     generator=torch.Generator().manual_seed(0))
    assert got == want  # the same computation on the same tensors
    for name, grad in old_hooks.grads.items():
        assert torch.equal(hooks.grads[name], grad), name


def test_bad_correction_inputs_are_refused_before_any_forward(setup: tuple) -> None:
    bundle, inputs, roll = setup
    mask = _mask(roll)
    adv = torch.zeros(N)
    engine = torch.zeros(mask.shape)
    cfg = CorrectionConfig()
    hooks = RecordingHooks(bundle, inputs, roll, packed=False)
    cases = [
        (UpdateBatch(advantages=adv, mask=mask, engine_logp=engine), "engine_logp and UpdateBatch.correction go"),
        (UpdateBatch(advantages=adv, mask=mask, correction=cfg), "engine_logp and UpdateBatch.correction go"),
        (UpdateBatch(advantages=adv, mask=mask, engine_logp=engine, correction=cfg, is_weights=torch.ones(mask.shape)),
         "is_weights and engine_logp both"),
        (UpdateBatch(advantages=adv, mask=mask, engine_logp=engine[:, :2], correction=cfg), "engine_logp shape"),
    ]
    nan = engine.clone()
    nan[2, 1] = math.nan
    cases.append((UpdateBatch(advantages=adv, mask=mask, engine_logp=nan, correction=cfg),
                  r"engine_logp has NaN on 1 masked-in tokens, first at \(response, position\) \[2, 1\]"))
    for batch, message in cases:
        with pytest.raises(ValueError, match=message):
            PPOUpdate(LossConfig()).run(batch, hooks, generator=torch.Generator())
    assert hooks.forwards == []
