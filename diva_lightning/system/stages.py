"""The typed hand-offs of one training round (rollout -> grades -> advantages -> update -> step outputs).

Each stage of `system/round.py` returns one of these instead of loose tensors or a string-keyed dict:

- `RolloutRound`: the prompts (`FamilyBatch`), their encoding, the responses (`Rollout`) and their grades
  (`RewardBreakdown`); dynamic sampling merges several into one (`RolloutRound.merge`).
- `Sampled`: the round the update trains on, with how many responses were generated for it (dropped draws
  included) and dynamic sampling's statistics.
- `Advantages`: one advantage per response and the difficulty label each was computed with.
- `RoundResult`: all of the above plus the update's statistics and the phase timings; `outputs()` is the
  `callbacks.outputs.StepOutputs` the callbacks read.

`TrainingSystem` is what the round's pieces need from the LightningModule (its public attributes and Lightning's
public methods), so they are written against a contract, not against the module's class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from diva_lightning.callbacks.outputs import StepOutputs
from diva_lightning.data.batch import FamilyBatch, merge_families
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.rewards import Reward, RewardBreakdown
from diva_lightning.rollout.base import Rollout, RolloutEngine
from diva_lightning.training.config import CorrectionConfig, LossConfig, PolicyConfig, SamplingConfig
from diva_lightning.training.estimators import AdvantageEstimator
from diva_lightning.training.ppo import PPOUpdate


class TrainingSystem(Protocol):
    """What the round, the scoring and the evaluation read from the LightningModule (`DivaGRPOModule`)."""

    bundle: PolicyBundle | None
    policy: torch.nn.Module | None
    reference: torch.nn.Module | None
    engine: RolloutEngine
    reward: Reward
    advantage: AdvantageEstimator
    update: PPOUpdate
    policy_cfg: PolicyConfig
    loss_cfg: LossConfig
    train_sampling: SamplingConfig
    val_sampling: SamplingConfig
    correction: CorrectionConfig | None
    num_generations: int
    grad_clip: float
    seed: int

    @property
    def device(self) -> torch.device: ...
    @property
    def sharded(self) -> bool: ...
    @property
    def global_step(self) -> int: ...
    @property
    def global_rank(self) -> int: ...
    @property
    def world_size(self) -> int: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
    def optimizers(self) -> Any: ...
    def manual_backward(self, loss: Tensor) -> None: ...
    def reduce_sum(self, value: Tensor) -> Tensor: ...


@dataclass
class RolloutRound:
    """One rollout round: the prompts, their encoding, the responses and their grades."""

    batch: FamilyBatch
    inputs: dict[str, Tensor]
    roll: Rollout
    graded: RewardBreakdown

    @property
    def prompt_ids(self) -> Tensor:
        """[N] the prompt (row of `batch`) each response answers, on the batch's device."""
        return self.roll.prompt_index.to(self.batch.family_index.device)

    @property
    def family_ids(self) -> Tensor:
        return self.batch.family_index[self.prompt_ids]

    @property
    def rewards(self) -> Tensor:
        return self.graded.reward.to(self.batch.family_index.device, torch.float32)

    @property
    def accuracy(self) -> Tensor:
        return self.graded.accuracy.to(self.batch.family_index.device, torch.float32)

    @staticmethod
    def merge(rounds: list[RolloutRound], keep: list[Tensor], *, pad_id: int) -> RolloutRound:
        """The kept responses of several rounds as one (``inputs`` must be re-encoded by the caller)."""
        parts, rolls, grades = [], [], []
        offset = 0
        for r, mask in zip(rounds, keep):
            rows = mask.nonzero().flatten().tolist()
            prompts = list(dict.fromkeys(int(r.roll.prompt_index[i]) for i in rows))  # whole groups, in order
            new_index = {p: offset + k for k, p in enumerate(prompts)}
            offset += len(prompts)
            parts.append((r.batch, prompts))
            index = torch.tensor([new_index[int(r.roll.prompt_index[i])] for i in rows], dtype=torch.long)
            rolls.append(r.roll.select(rows, index))
            grades.append([getattr(r.graded, f)[rows] for f in ("reward", "accuracy", "format")])
        graded = RewardBreakdown(*(torch.cat([g[k] for g in grades]) for k in range(3)))
        return RolloutRound(merge_families(parts), {}, Rollout.cat(rolls, pad_id=pad_id), graded)


@dataclass
class Sampled:
    """The round the update trains on; `generated` counts every response sampled for it (dropped draws too)."""

    round: RolloutRound
    generated: int
    stats: dict[str, float] = field(default_factory=dict)  # dynamic_sampling/* (empty without it)


@dataclass
class Advantages:
    """[N] float32 advantages and the [N] difficulty labels of the prompts they were computed with."""

    values: Tensor
    labels: Tensor


@dataclass
class RoundResult:
    """Everything one training round produced."""

    sampled: Sampled
    advantages: Advantages
    update_stats: dict[str, float]
    timings: dict[str, float]

    @property
    def round(self) -> RolloutRound:
        return self.sampled.round

    def outputs(self, device: torch.device) -> StepOutputs:
        """The per-response outputs the callbacks read (`DifficultyCallback`, `AdvantageMonitor`)."""
        r, batch, roll = self.round, self.round.batch, self.round.roll
        prompt_ids = r.prompt_ids
        return StepOutputs(
            rewards=r.rewards.detach(),
            accuracy=r.graded.accuracy.to(device, torch.float32).detach(),
            format=r.graded.format.detach(),
            prompt_ids=prompt_ids,
            family_ids=r.family_ids,
            is_original=batch.is_original[prompt_ids],
            tier=batch.tier[prompt_ids],
            kind=batch.kind[prompt_ids],
            difficulty=self.advantages.labels,
            question_ids=[batch.question_ids[i] for i in prompt_ids.tolist()],
            completion_lengths=roll.completion_mask.sum(-1),
            truncated=~roll.finished.to(device) if roll.finished is not None else None,
            advantages=self.advantages.values.detach(),
            timings=self.timings,
            given=frozenset(StepOutputs.keys()) - {"difficulty_stats", "loss"},  # "truncated" may be None
        )
