"""DAPO-style dynamic sampling: keep whole groups whose rewards differ, draw more questions until the batch is full.

`DynamicSampler` is the one owner of the side stream of extra question families: it is bound once
(`DivaGRPOModule.setup`, from the data module's `side_stream`) and only it draws from it. Every rank draws as often
as the neediest one (the count of spread units is agreed on with a minimum over ranks), so sharded ranks stay in
step; when `max_draws` is spent, zero-spread groups fill the batch (`core.filtering.select_units`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from diva_lightning.core.filtering import SpreadFilter, select_units, spread_filter
from diva_lightning.data.batch import FamilyBatch
from diva_lightning.system.stages import RolloutRound, Sampled
from diva_lightning.training.config import DynamicSamplingConfig


class SideStream(Protocol):
    """A stream of extra question families, planned and on ``device``, never touching the training stream's
    position (its own position is checkpointed by its owner)."""

    def draw(self, device: torch.device | str) -> FamilyBatch: ...


def side_stream_of(datamodule: object) -> SideStream:
    """The data module's `side_stream`, or a clear error naming what is missing."""
    stream = getattr(datamodule, "side_stream", None)
    if stream is None:
        raise ValueError("DivaGRPOModule: dynamic_sampling needs a data module with a side_stream (draws extra "
                         f"question families), got {type(datamodule).__name__}")
    return stream  # type: ignore[no-any-return]


class DynamicSampler:
    """Fills a round with groups that carry a learning signal (see the module docstring).

    Args:
        config: unit (prompt or family), metric (reward or accuracy), max_draws.
    """

    def __init__(self, config: DynamicSamplingConfig) -> None:
        self.config = config
        self.stream: SideStream | None = None

    def bind(self, stream: SideStream) -> None:
        """The side stream every extra draw comes from (set once per fit)."""
        self.stream = stream

    def spread(self, r: RolloutRound) -> SpreadFilter:
        """Which of ``r``'s units (prompts or families) have a spread in the configured metric."""
        family = self.config.unit == "family"
        values = r.accuracy.to(r.rewards.device) if self.config.metric == "accuracy" else r.rewards
        return spread_filter(values, r.prompt_ids, family_ids=r.family_ids if family else None)

    def fill(self, first: RolloutRound, *, rollout: Callable[[FamilyBatch, int], RolloutRound],
             encode: Callable[[FamilyBatch], dict[str, torch.Tensor]], min_over_ranks: Callable[[int], int],
             device: torch.device, pad_id: int) -> Sampled:
        """Draw (``rollout(batch, draw)``) until every rank has as many spread units as ``first`` has units, or
        `max_draws` rounds were sampled; the kept groups as one round, re-encoded."""
        if self.stream is None:
            raise RuntimeError("DynamicSampler: no side stream bound (DivaGRPOModule.setup binds the data module's "
                               "side_stream before fit)")
        target = first.batch.num_questions if self.config.unit == "family" else len(first.batch)
        rounds = [first]
        filters = [self.spread(first)]
        while (len(rounds) < self.config.max_draws
               and min_over_ranks(sum(f.num_spread_units for f in filters)) < target):
            rounds.append(rollout(self.stream.draw(device), len(rounds)))
            filters.append(self.spread(rounds[-1]))
        selection = select_units(filters, target)
        merged = RolloutRound.merge(rounds, selection.keep, pad_id=pad_id)
        merged.inputs = encode(merged.batch)
        stats = {
            "dynamic_sampling/draws": float(len(rounds)),
            "dynamic_sampling/generated_rollouts": float(selection.generated_rollouts),
            "dynamic_sampling/kept_rollouts": float(selection.kept_rollouts),
            "dynamic_sampling/filled_units": float(selection.num_filled),
            "dynamic_sampling/frac_spread_units": selection.spread_units / max(selection.generated_units, 1),
        }
        return Sampled(merged, generated=int(selection.generated_rollouts), stats=stats)
