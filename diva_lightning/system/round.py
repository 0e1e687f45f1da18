"""One DIVA training round (design.md section 2): rollout -> grades -> advantages -> update -> step outputs.

1. encode the batch's prompts (original + variants; images already perturbed on the device),
2. sample G responses per prompt (the rollout engine) and grade them (the reward: shaped reward and its
   accuracy/format parts) -> `RolloutRound`; with dynamic sampling, draw more until the batch is full -> `Sampled`,
3. advantages from the estimator (DIVA: local + global, batch z-score, difficulty weight, RRB) -> `Advantages`,
4. the PPO update (`scoring.run_update` -> `training.ppo.PPOUpdate`): epochs over mini-batches, one optimizer step
   each, after which the rollout engine is told (weight sync),
5. `RoundResult.outputs()`: the per-response `StepOutputs` that `DifficultyCallback` and `AdvantageMonitor` read.

`RoundRunner` holds no state of its own: every setting is read from the system (`stages.TrainingSystem`).

Deviation from the official code, on purpose: the rollout of step s is sampled under a seed of (seed, s) that the
engine mixes with the rank, so a resumed run samples exactly what an uninterrupted run would.
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from diva_lightning.callbacks.advantage_monitor import AdvantageMonitor
from diva_lightning.core.seeding import stable_seed
from diva_lightning.data.batch import FamilyBatch
from diva_lightning.rewards import RewardBreakdown
from diva_lightning.rollout.base import Rollout
from diva_lightning.system.dynamic import DynamicSampler
from diva_lightning.system.scoring import min_over_ranks, run_update
from diva_lightning.system.stages import Advantages, RolloutRound, RoundResult, Sampled, TrainingSystem
from diva_lightning.training.config import SamplingConfig


def _timed(timings: dict[str, float], phase: str, start: float) -> None:
    timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - start


class RoundRunner:
    """The stages of a round on a training system; `run` chains them (see the module docstring)."""

    def __init__(self, system: TrainingSystem, sampler: DynamicSampler | None = None) -> None:
        self.system, self.sampler = system, sampler

    def encode(self, batch: FamilyBatch) -> dict[str, Tensor]:
        assert self.system.bundle is not None
        return self.system.bundle.encode(batch.problems, batch.images_per_prompt())

    def sample(self, inputs: dict[str, Tensor], sampling: SamplingConfig, num_generations: int, seed: int
               ) -> Rollout:
        """``num_generations`` responses per prompt under ``sampling`` (temperature 0: greedy)."""
        s = self.system
        assert s.bundle is not None
        greedy = sampling.temperature <= 0
        return s.engine.generate(
            s.bundle, inputs, num_generations=num_generations, temperature=max(sampling.temperature, 1e-5),
            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy, seed=seed,
        )

    def grade(self, texts: list[str], answers: list[str]) -> RewardBreakdown:
        return self.system.reward(texts, answers)

    def rollout(self, batch: FamilyBatch, draw: int, timings: dict[str, float]) -> RolloutRound:
        """Encode, sample G responses per prompt and grade them (seconds added to ``timings``)."""
        s = self.system
        t = time.perf_counter()
        inputs = self.encode(batch)
        with torch.no_grad():  # the engine mixes in the rank
            roll = self.sample(inputs, s.train_sampling, s.num_generations,
                               stable_seed("rollout", s.seed, s.global_step, *(("draw", draw) if draw else ())))
        _timed(timings, "rollout", t)
        t = time.perf_counter()
        prompt_ids = roll.prompt_index.to(s.device)
        graded = self.grade(roll.texts, [batch.answers[i] for i in prompt_ids.tolist()])
        _timed(timings, "reward", t)
        return RolloutRound(batch, inputs, roll, graded)

    def fill(self, first: RolloutRound, timings: dict[str, float]) -> Sampled:
        """The round to train on: ``first`` itself, or dynamic sampling's kept groups of several draws."""
        if self.sampler is None:
            return Sampled(first, generated=first.roll.num_responses)
        assert self.system.bundle is not None
        return self.sampler.fill(first, rollout=lambda batch, draw: self.rollout(batch, draw, timings),
                                 encode=self.encode, min_over_ranks=lambda v: min_over_ranks(self.system, v),
                                 device=self.system.device, pad_id=int(self.system.bundle.tokenizer.pad_token_id))

    def advantages(self, r: RolloutRound, timings: dict[str, float]) -> Advantages:
        t = time.perf_counter()
        labels = r.batch.difficulty[r.prompt_ids]
        values = self.system.advantage(r.rewards, r.prompt_ids, r.family_ids, labels).to(torch.float32)
        timings["advantage"] = time.perf_counter() - t
        return Advantages(values, labels)

    def update(self, inputs: dict[str, Tensor], roll: Rollout, advantages: Tensor) -> dict[str, float]:
        """The PPO update of one round (engine asleep meanwhile is the caller's business: see `run`)."""
        return run_update(self.system, inputs, roll, advantages)

    def run(self, batch: FamilyBatch) -> RoundResult:
        """One whole round on ``batch``."""
        s = self.system
        assert s.policy is not None
        timings: dict[str, float] = {}
        sampled = self.fill(self.rollout(batch, 0, timings), timings)
        advantages = self.advantages(sampled.round, timings)
        t = time.perf_counter()
        s.policy.train()
        s.engine.sleep()
        stats = self.update(sampled.round.inputs, sampled.round.roll, advantages.values)
        s.engine.wake()
        timings["update"] = time.perf_counter() - t
        return RoundResult(sampled, advantages, stats, timings)


def monitor_logs_reward(trainer: Any) -> bool:
    """Whether an `AdvantageMonitor` logs ``reward`` (unprefixed, every step): then the module does not."""
    return any(isinstance(cb, AdvantageMonitor) and cb.prefix == "" and cb.log_every_n_steps == 1
               for cb in trainer.callbacks)


def log_round(module: pl.LightningModule, result: RoundResult, *, rollouts_generated: int) -> None:
    """Log a round's statistics through ``module.log`` (on step): the update's and dynamic sampling's, the variant
    fallbacks, the rollouts generated so far, the learning rate, the mean reward and the clipped ratio."""
    r, n = result.round, result.round.roll.num_responses
    module.log_dict({**result.update_stats, **result.sampled.stats}, on_step=True, on_epoch=False, prog_bar=False,
                    batch_size=n)
    for part in r.batch.meta.get("parts", [r.batch.meta]):
        for kind, count in part.get("fallbacks", {}).items():
            module.log(f"data/variant_fallbacks/{kind}", float(count), on_step=True, on_epoch=False, batch_size=n)
    # rollouts generated so far over all ranks (dynamic sampling's dropped draws included): what budgets compare.
    # Every rank draws as often as the others and each draw has the same size, so it is rank count x world.
    world = module.trainer.world_size
    module.log("rollouts/generated", float(rollouts_generated * world), on_step=True, on_epoch=False)
    module.log("lr", module.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)  # type: ignore[union-attr]
    if not monitor_logs_reward(module.trainer):  # logged once: by the AdvantageMonitor when there is one
        module.log("reward", r.rewards.mean(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
    if r.roll.finished is not None:  # TRL's name: responses cut at max_new_tokens
        clipped = (~r.roll.finished).float().mean()
        module.log("completions/clipped_ratio", clipped, on_step=True, on_epoch=False, batch_size=n)
