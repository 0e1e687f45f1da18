"""What a training batch hands the callbacks: the typed `StepOutputs`, and how it is found (Lightning's semantics).

`StepOutputs` is the contract between a `training_step` and the callbacks (`DifficultyCallback`,
`AdvantageMonitor`): one entry per response for N responses. Every field is optional (None: absent); each callback
documents what it requires. A module of your own returns a plain dict with these keys (Lightning's manual
optimization takes a dict or None from `training_step`); `StepOutputs.from_mapping` reads it. DIVA's module builds a
`StepOutputs` and returns `outputs.as_dict()`.

Lightning passes `on_train_batch_end` the dict returned by `training_step` (a returned tensor arrives wrapped as
`{"loss": tensor}`; a returned `None`, Lightning's way to skip a batch, arrives as `{}` or `None`). So:

- a dict with keys besides `loss`: those keys are the batch's outputs;
- `{"loss": tensor}` alone (`training_step` returned a tensor): the outputs are `pl_module.difficulty_outputs`, a dict
  (or a `StepOutputs`) the module sets in every such `training_step` (the fallback for code that must return the
  loss tensor);
- `None` or `{}` (`training_step` returned `None`): a skipped batch, no statistics, whatever the module's attributes
  say.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import lightning.pytorch as pl
from torch import Tensor

FALLBACK_ATTR = "difficulty_outputs"

Vector = Any
"""One entry per response: a tensor (any device), a list or a numpy array; [N], or [P, G] where a callback says so."""


@dataclass
class StepOutputs:
    """One training batch's per-response outputs (N responses; the keys of the dict a `training_step` returns).

    Attributes:
        rewards: [N] or [P, G] float, the shaped reward (`AdvantageMonitor`'s required key).
        accuracy: [N] float 0/1 or fractions, the correctness term (`DifficultyCallback`'s default statistic).
        format: [N] float, the format term of the reward.
        prompt_ids: [N] int or labels, the local group (responses to one prompt).
        family_ids: [N] int or labels, the global group (a question and its variants).
        is_original: [N] bool, the response answers the unmodified question.
        tier: [N] int, codes of `core.choices.TIERS` (0 easy, 1 medium, 2 hard).
        kind: [N] int, codes of `core.choices.STEP_KINDS` (0 original, 1 paraphrase, 2 image, 3 hint).
        difficulty: [N] float, the difficulty label the advantage used.
        question_ids: list[str] [N], the question each response answers (`DifficultyCallback`'s key).
        completion_lengths: [N] int, tokens per response.
        truncated: [N] bool, the response was cut at the token budget.
        advantages: [N] float, the final advantage of each response.
        timings: seconds per phase (rollout, reward, advantage, update).
        difficulty_stats: a `core.difficulty.DifficultyStats` (already aggregated; read instead of
            `question_ids` + `accuracy` when present).
        loss: the step's loss, when the module returns one.
        extra: any other key of a mapping (kept, read by no callback of ours).
        given: the keys the producer set, None included (`from_mapping`: the mapping's keys); None: the fields
            that are not None. A key given as None is an error where a callback needs a value (`has`).
    """

    rewards: Vector | None = None
    accuracy: Vector | None = None
    format: Vector | None = None
    prompt_ids: Vector | None = None
    family_ids: Vector | None = None
    is_original: Vector | None = None
    tier: Vector | None = None
    kind: Vector | None = None
    difficulty: Vector | None = None
    question_ids: Sequence[str] | None = None
    completion_lengths: Vector | None = None
    truncated: Vector | None = None
    advantages: Vector | None = None
    timings: Mapping[str, float] | None = None
    difficulty_stats: Any = None
    loss: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    given: frozenset[str] | None = None

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The documented keys (every field but `extra` and `given`)."""
        return tuple(f.name for f in fields(cls) if f.name not in ("extra", "given"))

    @classmethod
    def from_mapping(cls, outputs: Mapping[str, Any]) -> StepOutputs:
        """The documented keys of ``outputs`` as fields; other keys go to `extra`."""
        known = set(cls.keys())
        return cls(**{k: v for k, v in outputs.items() if k in known},
                   extra={k: v for k, v in outputs.items() if k not in known},
                   given=frozenset(k for k in outputs if k in known))

    def has(self, key: str) -> bool:
        """Whether the producer gave ``key`` (a mapping's key, even with the value None)."""
        return key in self.given if self.given is not None else getattr(self, key) is not None

    def as_dict(self) -> dict[str, Any]:
        """The given keys, plus `extra`: what `training_step` returns to Lightning."""
        return {**{k: getattr(self, k) for k in self.keys() if self.has(k)}, **self.extra}


def batch_outputs(outputs: Any, pl_module: pl.LightningModule, who: str) -> StepOutputs | None:
    """The callback outputs of one training batch, or None for a skipped batch (see the module docstring). `who`
    names the callback in the error raised when a returned tensor comes without `pl_module.difficulty_outputs`."""
    if outputs is None or (isinstance(outputs, Mapping) and not outputs):
        return None  # training_step returned None: Lightning skipped the batch
    if isinstance(outputs, StepOutputs):
        return outputs
    if isinstance(outputs, Mapping) and set(outputs) - {"loss"}:
        return StepOutputs.from_mapping(outputs)
    fallback = getattr(pl_module, FALLBACK_ATTR, None)
    if isinstance(fallback, StepOutputs):
        return fallback
    if isinstance(fallback, Mapping):
        return StepOutputs.from_mapping(fallback)
    raise KeyError(f"{who}: training_step returned only a loss and {type(pl_module).__name__}.{FALLBACK_ATTR} is "
                   f"{'missing' if fallback is None else type(fallback).__name__}; return a dict with the callback "
                   f"keys, or set {FALLBACK_ATTR} to one in every training_step (README, 'Callbacks in your own "
                   "Lightning project')")
