"""The variant plan as the authors' released code draws it (``plan="released"``).

Source: ``Siaaaaaa1/DIVA_GRPO_release`` HEAD f3936ce, ``verl/utils/gen_new_item.py`` (cited ``gen_new_item.py:L``).
The plan works on the integer difficulty D in 1..9 (a fractional D is rounded half up first).

1. Steps (``generate_variant_difficulty_samples``, :351-373; tables :50-59). V = 1: the target is
   ``{1: 9, 2: 8, 3: 7, 4: 6, 5: 6, 6: 5, 7: 5, 8: 5, 9: 4}[D]``; V >= 2: ``round(N(mean[D], 1))`` clipped to
   [1, 9] per variant. The step is ``target - D``. Only the first negative step of a family is kept; each later one
   is replaced by a step drawn uniformly from {0, 1, 2, 3} (:438-452; a *step*, not a target).
2. Action (``DIFFICULTY_FUNCTION_MAP``, :378-414): one entry of the step's list, uniformly
   (``random.choice``, :464). Every entry is (action, intensity, label shift): the label shift is what the entry
   adds to the variant's difficulty (``update_item_metadata``, :63-71), which is not always the step (step 4's
   noise and rotation move the label by 3, its "only vision" by 2). A paraphrase or a copy of the original keeps
   the label (``gen_variant_text`` and ``gen_origin_sample`` do not call ``update_item_metadata``, :226-242).
   Steps -8..-1 are think-step hints, 0 a paraphrase, 1..8 the tables in :data:`RELEASED_ACTIONS`.
3. Text (``select_variant_text``, :73-77: with probability 0.5 a paraphrase drawn uniformly, with replacement,
   else the original problem): a paraphrase action, noise and rotation call it once (p = 1/2 of a paraphrase);
   "only vision" calls it behind its own coin (:87-88, p = 1/4); the two-op transform behind a coin of
   ``0.2 + 0.07 * intensity`` (:323-325); a copy of the original and a hint use the original text.
4. Hints (``gen_think_step``, :260-301): all steps for a step <= -7, 3 for <= -5, 2 for <= -3, else 1.
5. Rotation (``gen_rotate``, :186-222): a multiple of 45 deg below intensity 0.25, of 30 deg below 0.45, else of
   1 deg, uniform among the multiples in [1, 359].

Every random draw comes from the ``torch.Generator`` passed in (the data module seeds it with
``core.seeding.stable_seed``), so a plan is a pure function of (D, V, generator state).

Where the project's realisation differs (the draws above do not):

- "only vision" (the problem drawn into a white band added to the image, the prompt replaced by
  "As shown in the <image>.") has no realisation here: it is planned as kind ``only_vision`` and the data side
  turns it into a copy of the original *labelled as a fallback* (counted, never silent).
- The two-op transform (``apply_random_transformations``, :305-343) rotates by the intensity read as degrees
  (0.3-0.5 deg) while its prompt says the image was rotated; here its rotation is drawn as ``gen_rotate`` would
  for that intensity. It applies only rotation when the record's image carries text (``text_in_image``, :313-315);
  ``allowed_ops`` without "noise" does the same here. Single noise (:120-135) ignores ``text_in_image`` in the
  released code, and here.
- The max-hint case reveals every stored step in the released code; the data side reveals at most all but one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from diva_lightning.core.choices import Tier
from diva_lightning.core.variants import OFFICIAL_TARGET_MEAN, OFFICIAL_V1_TARGET, VariantSpec

ActionName = Literal["origin", "paraphrase", "noise", "rotate", "only_vision", "two_ops", "hint"]


@dataclass(frozen=True)
class ReleasedAction:
    """One entry of a released step table: what is done, at which intensity, and how far it moves the label."""

    name: ActionName
    intensity: float = 0.0
    label_shift: int = 0


def _a(name: ActionName, intensity: float = 0.0, shift: int = 0) -> ReleasedAction:
    return ReleasedAction(name, intensity, shift)


_ORIGIN, _PARA = _a("origin"), _a("paraphrase")
# gen_new_item.py:388-414, entry for entry (a repeated entry is drawn twice as often).
RELEASED_ACTIONS: dict[int, tuple[ReleasedAction, ...]] = {
    **{s: (_a("hint", 0.0, s),) for s in range(-8, 0)},                                  # :379-386
    0: (_PARA,),                                                                          # :387
    1: (_ORIGIN, _ORIGIN, _PARA, _a("noise", 0.30, 1), _a("rotate", 0.30, 1), _PARA),     # :388-395
    2: (_a("noise", 0.35, 2), _a("rotate", 0.35, 2), _PARA, _a("only_vision", 0.50, 2), _PARA),  # :396-402
    3: (_a("noise", 0.40, 3), _a("rotate", 0.40, 3), _PARA, _a("only_vision", 0.40, 3)),  # :403-408
    4: (_a("noise", 0.45, 3), _a("rotate", 0.45, 3), _a("two_ops", 0.30, 4), _a("two_ops", 0.30, 4),
        _a("only_vision", 0.50, 2)),                                                      # :409
    5: (_a("two_ops", 0.30, 4), _a("two_ops", 0.35, 5), _a("only_vision", 0.50, 2)),      # :410
    6: (_a("two_ops", 0.30, 4), _a("two_ops", 0.40, 6), _a("only_vision", 0.50, 2)),      # :411
    7: (_a("two_ops", 0.30, 4), _a("two_ops", 0.45, 7), _a("only_vision", 0.50, 2)),      # :412
    8: (_a("two_ops", 0.30, 4), _a("two_ops", 0.50, 8), _a("only_vision", 0.50, 2)),      # :413
}


@dataclass(frozen=True)
class ReleasedDraw:
    """One drawn variant: the step, the table entry, and the text and angle drawn for it."""

    step: int
    action: ReleasedAction
    paraphrase_index: int | None
    rotation_deg: float = 0.0


def _uniform(g: torch.Generator) -> float:
    return float(torch.rand((), generator=g, dtype=torch.float64))


def _randint(low: int, high: int, g: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=g).item())


def released_steps(d: int, num_variants: int, generator: torch.Generator) -> list[int]:
    """The V steps (target - D) of a question of integer difficulty ``d`` (module docs, point 1)."""
    if num_variants == 1:
        steps = [OFFICIAL_V1_TARGET[d] - d]
    else:
        draws = torch.randn(num_variants, generator=generator, dtype=torch.float64) + OFFICIAL_TARGET_MEAN[d]
        # numpy's round (used by the released code) rounds half to even, as torch.round does
        steps = [int(t) - d for t in torch.round(draws).clamp(1, 9).tolist()]
    out, negative_seen = [], False
    for step in steps:
        if step < 0 and negative_seen:
            step = _randint(0, 3, generator)
        negative_seen = negative_seen or step < 0
        out.append(step)
    return out


def _rotation(intensity: float, g: torch.Generator) -> float:
    unit = 45 if intensity < 0.25 else 30 if intensity < 0.45 else 1
    return float(unit * _randint(1, 359 // unit, g))


def _text(name: ActionName, intensity: float, num_paraphrases: int, g: torch.Generator) -> int | None:
    """Paraphrase index the released code's text choice lands on, or None for the original problem."""
    if name in ("origin", "hint"):
        return None
    if name == "only_vision" and not _uniform(g) < 0.5:
        return None
    if name == "two_ops" and not _uniform(g) < 0.2 + 0.07 * intensity:
        return None
    if _uniform(g) < 0.5 and num_paraphrases > 0:
        return _randint(0, num_paraphrases - 1, g)
    return None


def draw_released(
    difficulty: float, num_variants: int, *, generator: torch.Generator, num_paraphrases: int = 5
) -> list[ReleasedDraw]:
    """Draw ``num_variants`` variants of a question of difficulty ``difficulty`` as the released code does.

    Raises:
        ValueError: ``difficulty`` outside [1, 9] or NaN, ``num_variants`` or ``num_paraphrases`` negative.
    """
    if math.isnan(difficulty) or not 1.0 <= difficulty <= 9.0:
        raise ValueError(f"the released plan needs a difficulty in [1, 9], got {difficulty}")
    if num_variants < 0 or num_paraphrases < 0:
        raise ValueError(f"need num_variants >= 0 and num_paraphrases >= 0, got {num_variants}, {num_paraphrases}")
    if num_variants == 0:
        return []
    d = min(9, max(1, math.floor(difficulty + 0.5)))
    draws = []
    for step in released_steps(d, num_variants, generator):
        table = RELEASED_ACTIONS[step]
        action = table[_randint(0, len(table) - 1, generator)]
        angle = _rotation(action.intensity, generator) if action.name in ("rotate", "two_ops") else 0.0
        draws.append(ReleasedDraw(step, action, _text(action.name, action.intensity, num_paraphrases, generator),
                                  angle))
    return draws


def hint_steps_released(step: int, max_hint_steps: int) -> int:
    """Think steps a hint of step ``step`` < 0 reveals (gen_new_item.py:278-285), capped at ``max_hint_steps``."""
    n = max_hint_steps if step <= -7 else 3 if step <= -5 else 2 if step <= -3 else 1
    return min(n, max_hint_steps)


def released_spec(draw: ReleasedDraw, tier: Tier, *, allowed_ops: tuple[str, ...], max_hint_steps: int) -> VariantSpec:
    """The :class:`VariantSpec` the data side realises for one released draw (module docs for the differences)."""
    a = draw.action
    delta = float(a.label_shift)
    if a.name == "origin" or (a.name == "paraphrase" and draw.paraphrase_index is None):
        return VariantSpec("original", tier, 0.0)
    if a.name == "paraphrase":
        return VariantSpec("paraphrase", tier, 0.0, paraphrase_index=draw.paraphrase_index)
    if a.name == "hint":
        return VariantSpec("hint", tier, delta, hint_steps=hint_steps_released(draw.step, max_hint_steps))
    if a.name == "only_vision":
        return VariantSpec("only_vision", tier, delta, a.intensity, paraphrase_index=draw.paraphrase_index)
    if a.name == "noise":
        ops: tuple[str, ...] = ("noise",)
    elif a.name == "rotate":
        ops = ("rotate",)
    else:  # two_ops: rotation and noise; rotation only for an image that carries text
        ops = ("rotate", "noise") if "noise" in allowed_ops else ("rotate",)
    rotation = draw.rotation_deg if "rotate" in ops else 0.0
    return VariantSpec("image", tier, delta, a.intensity, ops, rotation, 0, draw.paraphrase_index)


def plan_released(
    difficulty: float,
    num_variants: int,
    tier: Tier,
    *,
    generator: torch.Generator,
    num_paraphrases: int,
    allowed_ops: tuple[str, ...],
    max_hint_steps: int,
) -> list[VariantSpec]:
    """``plan_variants(..., plan="released")``: the draws of :func:`draw_released` as variant specs."""
    draws = draw_released(difficulty, num_variants, generator=generator, num_paraphrases=num_paraphrases)
    return [released_spec(x, tier, allowed_ops=allowed_ops, max_hint_steps=max_hint_steps) for x in draws]
