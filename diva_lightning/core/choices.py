"""Every string choice of the platform, declared once, and the one validator that checks them.

A setting whose value is one of a few words is typed with one of the ``Literal`` aliases below, in the dataclass or
``__init__`` that takes it (so jsonargparse and mypy read the same list), and checked with :func:`choice_problems`
(a list of problems, for settings that collect every problem before raising once) or :func:`check_choice` (raises).
The tuples (``AGGS`` ...) are the aliases' values, for loops and messages; nothing else spells the words out.

The same idea has the same word everywhere: what to do with a bad input is ``raise`` or ``skip`` (``OnError``) in
every option that decides it.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

# --- the policy loss (core.loss, training.config.LossConfig)
Agg = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
KlType = Literal["k1", "k3", "low_var_kl"]
RatioLevel = Literal["token", "sequence"]
# --- rollout correction (core.correction, training.config.CorrectionConfig)
IsLevel = Literal["token", "sequence"]
IsMode = Literal["truncate", "mask"]
# --- difficulty (core.difficulty, callbacks.DifficultyCallback)
DifficultyRule = Literal["linear", "binned"]
DifficultyStatistic = Literal["accuracy", "reward"]
"""What alpha is averaged from: "accuracy" (the paper) or "reward" (the authors' code: the combined reward)."""
DifficultyUpdate = Literal["step", "epoch"]
# --- advantage estimators (core.advantage, training.estimators)
WeightTerms = Literal["global", "both"]
RrbMode = Literal["range", "threshold"]
GrpoScale = Literal["group", "batch", "none"]
# --- variants (core.tiers, core.released_plan, data.planner)
Plan = Literal["tiers", "official", "paraphrase", "released"]
Tier = Literal["easy", "medium", "hard"]
VariantKind = Literal["paraphrase", "image", "hint", "original", "only_vision"]
""""original" (an extra copy of the question) and "only_vision" (text drawn into the image) occur only in the
official plans."""
StepKind = Literal["original", "paraphrase", "image", "hint"]
"""How a prompt of a training batch was made, as the batch codes it (0..3, in this order) and the monitor logs it."""
ImageOp = Literal["rotate", "noise", "blur", "downup", "salt_pepper"]
DownUp = Literal["monotone", "official"]
# --- data and inputs
OnError = Literal["raise", "skip"]
"""A bad row, or a prompt longer than the budget: stop before training, naming it (raise), or leave it out and
count it (skip)."""
ReadMode = Literal["raise", "skip", "collect"]
"""A reader's: ``OnError`` or "collect" (keep going and return every problem: the checks that report all rows)."""
AugmentTask = Literal["variants", "think_steps"]
"""What the offline teacher fills in a record (teacher.pipeline, `augment --only`)."""
# --- the training system (training.config)
SamplingUnit = Literal["prompt", "family"]
FilterMetric = Literal["reward", "accuracy"]
WeightsDtype = Literal["float32", "bfloat16"]
AttnImplementation = Literal["sdpa", "sdpa_varlen", "eager", "flash_attention_2", "flash_attention_3"]
EngineDtype = Literal["auto", "bfloat16", "float16", "float32"]


def values(choice: Any) -> tuple[str, ...]:
    """The words of a ``Literal`` alias, in their declared order."""
    return tuple(get_args(choice))


AGGS = values(Agg)
KL_TYPES = values(KlType)
RATIO_LEVELS = values(RatioLevel)
IS_LEVELS = values(IsLevel)
IS_MODES = values(IsMode)
RULES = values(DifficultyRule)
DIFFICULTY_STATISTICS = values(DifficultyStatistic)
DIFFICULTY_UPDATES = values(DifficultyUpdate)
WEIGHT_TERMS = values(WeightTerms)
RRB_MODES = values(RrbMode)
GRPO_SCALES = values(GrpoScale)
PLANS = values(Plan)
TIERS = values(Tier)
KINDS = values(VariantKind)
STEP_KINDS = values(StepKind)
IMAGE_OPS = values(ImageOp)
DOWNUPS = values(DownUp)
ON_ERROR = values(OnError)
READ_MODES = values(ReadMode)
AUGMENT_TASKS = values(AugmentTask)
SAMPLING_UNITS = values(SamplingUnit)
FILTER_METRICS = values(FilterMetric)
WEIGHTS_DTYPES = values(WeightsDtype)
ATTN_IMPLEMENTATIONS = values(AttnImplementation)
ENGINE_DTYPES = values(EngineDtype)


def choice_problems(name: str, value: object, allowed: Any, *, optional: bool = False) -> list[str]:
    """``[]`` when ``value`` is one of ``allowed`` (a ``Literal`` alias or a tuple of values; ``None`` also when
    ``optional``), else one problem naming the setting, the allowed words and the value given."""
    words = values(allowed) if not isinstance(allowed, tuple) else allowed
    if value in words or (optional and value is None):
        return []
    listed = ", ".join(str(w) for w in words) + (" or null" if optional else "")
    return [f"{name} must be one of {listed}, got {value!r}"]


def check_choice(name: str, value: object, allowed: Any, *, optional: bool = False) -> None:
    """Raise ``ValueError`` with :func:`choice_problems`'s message unless ``value`` is allowed."""
    problems = choice_problems(name, value, allowed, optional=optional)
    if problems:
        raise ValueError(problems[0])
