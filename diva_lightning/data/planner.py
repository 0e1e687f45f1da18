"""The family planner: questions and their current difficulties in, typed prompt rows out (design.md s2, s4).

A pure function of its inputs (records, difficulties, settings, a seeded generator): no Lightning, no device, no
images. :func:`plan_families` decides, for each question, the original prompt and its V variants
(`core.tiers.plan_variants`), renders their text (`data.variants.render_variant`) and the image-perturbation
parameters (`data.perturb.params_for`); the data module only packs the rows into a `FamilyBatch`.

No silent fallbacks (issue 11): a planned variant the record cannot provide (a paraphrase without
`variants`, a hint without `think_steps`, an image variant of a text-only question) becomes a copy of the
original *labelled as one*: kind ``original``, delta 0, and ``fallback`` naming the planned kind and why. It
never keeps the shifted difficulty label of the variant it failed to be.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from diva_lightning.core.choices import IMAGE_OPS, ImageOp, Plan, choice_problems
from diva_lightning.core.difficulty import DEFAULT_DIFFICULTY
from diva_lightning.core.seeding import stable_seed
from diva_lightning.core.tiers import VariantSpec, plan_variants, tier_of
from diva_lightning.data.perturb import params_for
from diva_lightning.data.schema import QuestionRecord
from diva_lightning.data.variants import render_variant

ORIGINAL = "original"


@dataclass(frozen=True)
class PlanSettings:
    """How variants are planned: the data module's plan settings, stored here only and validated once.

    Attributes:
        num_variants: V, variants per question (0: plain GRPO stream).
        plan: one of ``core.choices.PLANS``.
        band / d_mid / d_min / d_max: the difficulty scale and the medium tier's half-width.
        intensity_range: (low, high) perturbation intensity of image variants (``plan="tiers"``).
        image_ops: image ops the planner may use (a subset of ``core.choices.IMAGE_OPS``).
    """

    num_variants: int = 1
    plan: Plan = "tiers"
    band: float = 0.5
    d_mid: float = DEFAULT_DIFFICULTY
    d_min: float = 1.0
    d_max: float = 9.0
    intensity_range: tuple[float, float] = (0.2, 0.6)
    image_ops: tuple[ImageOp, ...] = IMAGE_OPS  # type: ignore[assignment]

    def check(self) -> list[str]:
        """Problems with these settings, one string each (empty when valid)."""
        problems = []
        if self.num_variants < 0:
            problems.append(f"num_variants must be >= 0, got {self.num_variants}")
        problems += choice_problems("plan", self.plan, Plan)
        if not self.d_min < self.d_mid < self.d_max:
            problems.append(f"need d_min < d_mid < d_max, got {self.d_min}, {self.d_mid}, {self.d_max}")
        if self.band < 0:
            problems.append(f"band must be >= 0, got {self.band}")
        lo, hi = self.intensity_range
        if not 0.0 <= lo <= hi <= 1.0 or hi == 0.0:
            problems.append(f"intensity_range must satisfy 0 <= low <= high <= 1, high > 0; got {self.intensity_range}")
        unknown = [op for op in self.image_ops if op not in IMAGE_OPS]
        if unknown or not self.image_ops:
            problems.append(f"image_ops must be a non-empty subset of {', '.join(IMAGE_OPS)}, got {self.image_ops}")
        return problems


@dataclass(frozen=True)
class PlannedPrompt:
    """One prompt of a family batch.

    Attributes:
        family: index of the question in the batch (0..B-1).
        record: the original question.
        text: the prompt text (problem or variant, before the prompt template).
        kind: ``original`` | ``paraphrase`` | ``image`` | ``hint`` (what the prompt really is).
        label: the prompt's difficulty label, ``clip(D + delta)``.
        question_difficulty: the question's D when planned.
        tier: the question's tier.
        perturb: per-image Kornia parameters (``params_for`` keys plus ``seed``), or None.
        fallback: for a variant that could not be realised: ``"<planned kind>: <why>"``; else None.
    """

    family: int
    record: QuestionRecord
    text: str
    kind: str
    label: float
    question_difficulty: float
    tier: str
    perturb: dict[str, float] | None = None
    fallback: str | None = None

    @property
    def fallback_kind(self) -> str | None:
        """The kind that was planned but could not be realised (None when none failed)."""
        return None if self.fallback is None else self.fallback.split(":", 1)[0]


def _allowed_ops(record: QuestionRecord, settings: PlanSettings) -> tuple[str, ...]:
    # The authors perturb images that carry text (OCR questions) by rotation only: noise or blur can make the
    # printed question unreadable.
    if record.meta.get("text_in_image") is True:
        return ("rotate",)
    return settings.image_ops


def _realise(rec: QuestionRecord, spec: VariantSpec, has_images: bool) -> tuple[str, str | None]:
    """(text, None) for a variant the record provides, else (the original problem, why not).

    An image or hint variant that the planner also put on paraphrased text stays an image or hint variant on
    the original text when the record has no paraphrases: the rewording is optional diversity, the
    perturbation or hint is the variant.
    """
    if spec.kind == "image" and not has_images:
        return rec.problem, "no image to perturb"
    if spec.kind != "paraphrase" and spec.paraphrase_index is not None and not rec.variants:
        spec = replace(spec, paraphrase_index=None)
    rendered = render_variant(rec, spec)
    if rendered.fallback is not None:
        return rec.problem, rendered.fallback
    return rendered.prompt, None


def plan_families(
    records: Sequence[QuestionRecord],
    difficulties: Sequence[float],
    settings: PlanSettings,
    *,
    generator: torch.Generator,
    image_size: Callable[[int], tuple[int, int] | None],
    noise_key: Callable[[QuestionRecord, int], int] | None = None,
) -> list[PlannedPrompt]:
    """Plan every question's family: the original prompt first, then its V variants, question after question.

    Args:
        records: the B questions of the batch.
        difficulties: their current D (same order).
        settings: see :class:`PlanSettings`.
        generator: the seeded source of every random draw (variant kinds, angles, paraphrase indices).
        image_size: (H, W) of question b's first image, or None for a text-only question.
        noise_key: seed of an image variant's noise given (record, row index in the output); default
            ``stable_seed(record.id, row)``.
    Returns:
        the prompt rows, ``len = B * (1 + V)``, grouped by family.
    """
    if len(records) != len(difficulties):
        raise ValueError(f"{len(records)} records but {len(difficulties)} difficulties")
    key = noise_key or (lambda rec, row: stable_seed("perturb", rec.id, row))
    s = settings
    rows: list[PlannedPrompt] = []
    for b, (rec, d) in enumerate(zip(records, difficulties)):
        tier = tier_of(d, d_mid=s.d_mid, band=s.band)
        base = {"family": b, "record": rec, "question_difficulty": d, "tier": tier}
        rows.append(PlannedPrompt(text=rec.problem, kind=ORIGINAL, label=d, **base))  # type: ignore[arg-type]
        if s.num_variants == 0:
            continue
        specs = plan_variants(
            d, s.num_variants, plan=s.plan, d_mid=s.d_mid, band=s.band, d_min=s.d_min, d_max=s.d_max,
            num_paraphrases=max(len(rec.variants), 1), intensity_range=s.intensity_range,
            allowed_ops=_allowed_ops(rec, s), generator=generator,
        )
        size = image_size(b)
        for spec in specs:
            text, why = _realise(rec, spec, size is not None)
            if why is not None:
                rows.append(PlannedPrompt(text=text, kind=ORIGINAL, label=d, fallback=f"{spec.kind}: {why}",
                                          **base))  # type: ignore[arg-type]
                continue
            perturb = None
            if spec.kind == "image":
                assert size is not None
                perturb = params_for(spec, image_size=size)
                # per-image noise key: the perturbation never depends on batching or sharding
                perturb["seed"] = key(rec, len(rows))
            label = min(max(d + float(spec.delta), s.d_min), s.d_max)
            rows.append(PlannedPrompt(text=text, kind=spec.kind, label=label, perturb=perturb,
                                      **base))  # type: ignore[arg-type]
    return rows
