"""Difficulty tiers and the per-question variant plan (design.md section 4).

A question of difficulty D falls in a tier (D_mid = 5, band b = 0.5 by default):
easy (D < D_mid - b), medium (D_mid - b <= D <= D_mid + b), hard (D > D_mid + b).
:func:`plan_variants` turns D into a list of :class:`VariantSpec`; the data package realises them
(text edits on the host, Kornia perturbations on the device). This module only decides *what* to do.

Plans
-----
``plan="tiers"`` (paper, default): every variant follows the question's tier.

- easy -> image variants. ``intensity = lo + (hi - lo) * f``, ``f = (D_mid - b - D) / (D_mid - b - d_min)``
  clipped to [0, 1] and ``(lo, hi) = intensity_range = (0.2, 0.6)``: the easiest question gets ``hi``.
  ``delta = (D_mid - D) * intensity / hi`` > 0, so the variant's label moves towards D_mid and reaches
  it for the strongest perturbation. One image op below intensity 0.45, two from there on; each image
  variant also uses a paraphrase with probability ``text_prob``.
- medium -> paraphrases, delta 0, distinct paraphrase indices while they last.
- hard -> think-step hints, ``steps = clamp(floor(D - D_mid - 1), 1, max_hint_steps)``: 1 step for D in
  [6, 8), 2 for [8, 9), 3 for D >= 9 (the official steps; fractional D uses the bin it falls in).
  ``delta = -(D - D_mid) * steps / max_hint_steps`` < 0. Extra hint variants of one question are hints
  on paraphrased text so they differ.

``plan="official"`` (authors' code, defined on the 1..9 scale): targets come from the V=1 table or,
for V >= 2, ``round(N(mean[D], 1))`` clipped to [1, 9]; D is rounded half-up for the table lookups.
A target above round(D) -> image variant (``delta = target - D``, intensity
``clip(0.25 + 0.05 * (target - round(D)), 0.3, 0.5)``: the official 0.30/0.35/.../0.50 ladder; two ops
from a step of 4 on); equal -> paraphrase (delta 0); below -> hint with the official steps by size of
the step (<= -7: ``max_hint_steps``, <= -5: 3, <= -3: 2, else 1), ``delta = target - D``. Only the
first hint of a family is kept; later ones are redrawn as a step in {0, 1, 2, 3} (as the official code).

``plan="released"``: the authors' released ``gen_new_item.py`` draw for draw (``core.released_plan``).

``plan="paraphrase"`` (Share-GRPO, R1-ShareVL arXiv 2505.16673: semantically consistent rewordings of every
question, no difficulty adaptation): every variant is a paraphrase with delta 0 whatever the tier, distinct
paraphrase indices while they last (exactly what ``plan="tiers"`` gives a medium question). The tier is still
recorded, so per-tier metrics stay comparable with the other plans.

``allowed_ops`` restricts the image ops of the plans (official: rotation only for records whose
image carries the question's text, ``text_in_image: true``); a two-op variant then draws its ops
from the allowed ones, so with a single allowed op it applies that op alone.

Rotation angles (official): intensity < 0.25 -> a multiple of 45 deg, < 0.45 -> of 30 deg, else of
1 deg, uniformly among the multiples in [1, 359].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# IMAGE_OPS, PLANS, TIERS and VariantSpec are re-exported (``X as X``) for the callers that import them from here.
from diva_lightning.core.choices import IMAGE_OPS as IMAGE_OPS
from diva_lightning.core.choices import PLANS as PLANS
from diva_lightning.core.choices import TIERS as TIERS
from diva_lightning.core.choices import Plan, Tier, check_choice
from diva_lightning.core.difficulty import DEFAULT_DIFFICULTY
from diva_lightning.core.released_plan import plan_released
from diva_lightning.core.variants import OFFICIAL_TARGET_MEAN, OFFICIAL_V1_TARGET
from diva_lightning.core.variants import VariantSpec as VariantSpec

# Intensity thresholds that pick the rotation step (official NOISE_INTENSITY_THRESHOLDS).
_ROT_LOW, _ROT_MEDIUM = 0.25, 0.45
# From this intensity on an image variant combines two ops.
_TWO_OPS_FROM = 0.45


def tier_of(d: float, *, d_mid: float = DEFAULT_DIFFICULTY, band: float = 0.5) -> Tier:
    """Tier of one difficulty: "easy" (d < d_mid - band), "hard" (d > d_mid + band), else "medium"."""
    if math.isnan(d):
        raise ValueError("difficulty is NaN")
    if d < d_mid - band:
        return "easy"
    if d > d_mid + band:
        return "hard"
    return "medium"


def tier_codes(d: Tensor, *, d_mid: float = DEFAULT_DIFFICULTY, band: float = 0.5) -> Tensor:
    """Vectorised :func:`tier_of`: Tensor[N] float -> Tensor[N] int64 codes into ``TIERS``.

    0 = easy, 1 = medium, 2 = hard (so ``TIERS[code]`` is the name).
    """
    if bool(torch.isnan(d).any()):
        raise ValueError(f"difficulty has NaN at indices {torch.isnan(d).nonzero()[:, 0].tolist()}")
    codes = torch.ones_like(d, dtype=torch.int64)
    codes[d < d_mid - band] = 0
    codes[d > d_mid + band] = 2
    return codes


def tiers_of(d: Tensor, *, d_mid: float = DEFAULT_DIFFICULTY, band: float = 0.5) -> list[Tier]:
    """Vectorised :func:`tier_of` returning names: Tensor[N] -> list of N tier names."""
    names: tuple[Tier, ...] = ("easy", "medium", "hard")
    return [names[c] for c in tier_codes(d, d_mid=d_mid, band=band).tolist()]


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform integer in [low, high] inclusive."""
    return int(torch.randint(low, high + 1, (1,), generator=generator).item())


def rotation_angle(intensity: float, generator: torch.Generator) -> float:
    """The planner's rotation angle for an image variant of ``intensity`` (the module docs' rule), one draw."""
    step = 45 if intensity < _ROT_LOW else 30 if intensity < _ROT_MEDIUM else 1
    return float(step * _randint(1, 359 // step, generator))


def _image_spec(
    tier: Tier,
    delta: float,
    intensity: float,
    n_ops: int,
    text_index: int | None,
    generator: torch.Generator,
    allowed_ops: tuple[str, ...] = IMAGE_OPS,
) -> VariantSpec:
    """An image variant with ``min(n_ops, len(allowed_ops))`` distinct ops drawn uniformly from ``allowed_ops``.

    ``allowed_ops`` is in canonical ``IMAGE_OPS`` order, so the default draws exactly as before.
    """
    picks = torch.randperm(len(allowed_ops), generator=generator)[:n_ops].tolist()
    ops = tuple(allowed_ops[i] for i in sorted(picks))
    rot = rotation_angle(intensity, generator) if "rotate" in ops else 0.0
    return VariantSpec("image", tier, delta, intensity, ops, rot, 0, text_index)


class _Paraphrases:
    """Hands out paraphrase indices without repeats until all ``n`` are used, then starts over."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator, self.queue = n, generator, list[int]()

    def next(self) -> int | None:
        if self.n == 0:
            return None
        if not self.queue:
            self.queue = torch.randperm(self.n, generator=self.generator).tolist()
        return self.queue.pop(0)


def hint_steps_for(d: float, *, d_mid: float = DEFAULT_DIFFICULTY, max_hint_steps: int = 3) -> int:
    """Official hint length by difficulty: 1 for D in [6, 8), 2 for [8, 9), 3 for >= 9 (capped)."""
    return max(1, min(max_hint_steps, math.floor(d - d_mid - 1.0)))


def _official_hint_steps(step: int, max_hint_steps: int) -> int:
    """Official hint length by the size of a negative target step (authors' gen_think_step)."""
    if step <= -7:
        return max_hint_steps
    if step <= -5:
        return min(3, max_hint_steps)
    if step <= -3:
        return min(2, max_hint_steps)
    return min(1, max_hint_steps)


def _paraphrases(tier: Tier, v: int, para: _Paraphrases) -> list[VariantSpec]:
    """``v`` paraphrase variants (delta 0) of a question of ``tier``."""
    return [VariantSpec("paraphrase", tier, 0.0, paraphrase_index=para.next()) for _ in range(v)]


def _plan_tiers(
    d: float,
    v: int,
    tier: Tier,
    d_mid: float,
    band: float,
    d_min: float,
    max_hint_steps: int,
    intensity_range: tuple[float, float],
    text_prob: float,
    para: _Paraphrases,
    g: torch.Generator,
    allowed_ops: tuple[str, ...],
) -> list[VariantSpec]:
    if tier == "medium":
        return _paraphrases(tier, v, para)
    if tier == "hard":
        steps = hint_steps_for(d, d_mid=d_mid, max_hint_steps=max_hint_steps)
        delta = -(d - d_mid) * steps / max_hint_steps
        return [
            VariantSpec(
                "hint", tier, delta, hint_steps=steps, paraphrase_index=None if j == 0 else para.next()
            )
            for j in range(v)
        ]
    lo, hi = intensity_range
    top = d_mid - band
    frac = 1.0 if top <= d_min else min(1.0, max(0.0, (top - d) / (top - d_min)))
    intensity = lo + (hi - lo) * frac
    delta = (d_mid - d) * intensity / hi
    n_ops = 2 if intensity >= _TWO_OPS_FROM else 1
    out = []
    for _ in range(v):
        use_text = float(torch.rand((), generator=g)) < text_prob
        out.append(_image_spec(tier, delta, intensity, n_ops, para.next() if use_text else None, g, allowed_ops))
    return out


def _plan_official(
    d: float,
    v: int,
    tier: Tier,
    max_hint_steps: int,
    para: _Paraphrases,
    g: torch.Generator,
    allowed_ops: tuple[str, ...],
) -> list[VariantSpec]:
    d_int = min(9, max(1, math.floor(d + 0.5)))
    if v == 1:
        targets = [OFFICIAL_V1_TARGET[d_int]]
    else:
        draws = torch.randn(v, generator=g, dtype=torch.float64) + OFFICIAL_TARGET_MEAN[d_int]
        targets = [int(t) for t in torch.round(draws).clamp(1, 9).tolist()]
    out: list[VariantSpec] = []
    hint_seen = False
    for target in targets:
        step = target - d_int
        if step < 0 and hint_seen:
            step = _randint(0, 3, g)  # official: later hints become a random non-negative step
            target = min(9, d_int + step)
            step = target - d_int
        if step > 0:
            intensity = min(0.5, max(0.3, 0.25 + 0.05 * step))
            n_ops = 2 if step >= 4 else 1
            out.append(_image_spec(tier, target - d, intensity, n_ops, None, g, allowed_ops))
        elif step == 0:
            out.append(VariantSpec("paraphrase", tier, 0.0, paraphrase_index=para.next()))
        else:
            hint_seen = True
            steps = _official_hint_steps(step, max_hint_steps)
            out.append(VariantSpec("hint", tier, target - d, hint_steps=steps))
    return out


def plan_variants(
    difficulty: float,
    num_variants: int,
    *,
    generator: torch.Generator,
    plan: Plan = "tiers",
    d_mid: float = DEFAULT_DIFFICULTY,
    band: float = 0.5,
    d_min: float = 1.0,
    d_max: float = 9.0,
    num_paraphrases: int = 5,
    max_hint_steps: int = 3,
    intensity_range: tuple[float, float] = (0.2, 0.6),
    text_prob: float = 0.5,
    allowed_ops: tuple[str, ...] | None = None,
) -> list[VariantSpec]:
    """Plan ``num_variants`` variants for a question of difficulty ``difficulty`` (see module docs).

    Deterministic given the state of ``generator`` (all randomness is drawn from it).

    Args:
        allowed_ops: restrict image variants to these ops (a non-empty subset of ``IMAGE_OPS``), e.g.
            ``("rotate",)`` for a record with ``text_in_image: true`` (official: rotation only, since
            noise or blur can make printed text unreadable). A variant that would combine two ops uses
            as many distinct allowed ops as there are, so with one allowed op it has that op alone.
            None = all of ``IMAGE_OPS`` (and the same draws as before this option existed).

    Returns:
        list of ``num_variants`` :class:`VariantSpec` (the original prompt is not included).
    """
    check_choice("plan", plan, Plan)
    if not (d_min <= difficulty <= d_max):
        raise ValueError(f"difficulty {difficulty} outside [d_min, d_max] = [{d_min}, {d_max}]")
    if num_variants < 0 or num_paraphrases < 0 or max_hint_steps < 1:
        raise ValueError(
            f"need num_variants >= 0, num_paraphrases >= 0, max_hint_steps >= 1; got "
            f"{num_variants}, {num_paraphrases}, {max_hint_steps}"
        )
    lo, hi = intensity_range
    if not 0.0 <= lo <= hi <= 1.0 or hi == 0.0:
        raise ValueError(f"intensity_range must satisfy 0 <= lo <= hi <= 1, hi > 0; got {intensity_range}")
    ops = IMAGE_OPS
    if allowed_ops is not None:
        unknown = [op for op in allowed_ops if op not in IMAGE_OPS]
        if unknown or not allowed_ops:
            raise ValueError(
                f"allowed_ops must be a non-empty subset of {list(IMAGE_OPS)}; got {list(allowed_ops)}"
            )
        ops = tuple(op for op in IMAGE_OPS if op in allowed_ops)  # canonical order, no repeats
    if num_variants == 0:
        return []
    tier = tier_of(difficulty, d_mid=d_mid, band=band)
    para = _Paraphrases(num_paraphrases, generator)
    if plan == "paraphrase":
        return _paraphrases(tier, num_variants, para)
    if plan == "released":
        return plan_released(difficulty, num_variants, tier, generator=generator, num_paraphrases=num_paraphrases,
                             allowed_ops=ops, max_hint_steps=max_hint_steps)
    if plan == "official":
        return _plan_official(difficulty, num_variants, tier, max_hint_steps, para, generator, ops)
    return _plan_tiers(
        difficulty,
        num_variants,
        tier,
        d_mid,
        band,
        d_min,
        max_hint_steps,
        (lo, hi),
        text_prob,
        para,
        generator,
        ops,
    )
