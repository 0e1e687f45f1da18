"""`DivaGRPOModule`'s settings checked together before anything loads: every problem in one message."""

from __future__ import annotations

from typing import Any

from diva_lightning.training.config import DynamicSamplingConfig
from diva_lightning.training.ppo import PPOUpdate


def check_settings(module: Any, dynamic_sampling: DynamicSamplingConfig | None, num_generations: int, lr: float,
                   grad_clip: float, *, ppo_epochs: int, mini_batch_size: int | None,
                   micro_batch_size: int | None) -> PPOUpdate:
    """Check the module's configs (``prompt``, ``policy_cfg``, ``loss_cfg``, the samplings, ``correction``, already
    set on ``module``) and the other arguments; returns the `PPOUpdate` they make. Raises `ValueError` naming every
    problem."""
    problems = module.prompt.check() + module.policy_cfg.check() + module.loss_cfg.check()
    problems += module.train_sampling.check("train_sampling") + module.val_sampling.check("val_sampling")
    if module.correction is not None:
        problems += module.correction.check()
    if dynamic_sampling is not None:
        problems += dynamic_sampling.check()
    if num_generations < 1:
        problems.append(f"num_generations must be >= 1, got {num_generations}")
    if module.train_sampling.num_samples != 1:
        problems.append("train_sampling.num_samples must stay 1 (rollouts draw num_generations per prompt)")
    if module.train_sampling.temperature <= 0:
        problems.append("train_sampling.temperature must be > 0: rollouts sample")
    if lr <= 0 or grad_clip < 0:
        problems.append(f"lr must be > 0 and grad_clip >= 0, got {lr}, {grad_clip}")
    update = None
    try:
        update = PPOUpdate(module.loss_cfg, epochs=ppo_epochs, mini_batch_size=mini_batch_size,
                           micro_batch_size=micro_batch_size, max_len=module.train_sampling.max_new_tokens,
                           max_tokens_per_micro_batch=module.policy_cfg.max_tokens_per_micro_batch)
    except ValueError as err:
        problems.extend(p for p in str(err).split("; ") if p not in problems)
    if problems:
        raise ValueError("DivaGRPOModule: " + "; ".join(problems))
    assert update is not None
    return update
