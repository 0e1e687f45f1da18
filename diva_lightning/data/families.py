"""Variant families: a batch of questions in, a `FamilyBatch` of each question's original prompt and V variants out.

:class:`FamilyBuilder` looks the questions' current difficulties up in the table it was handed
(:meth:`FamilyBuilder.use_difficulty`), plans the variants (`data.planner.plan_families`, seeded by
(seed, batch position, rank)), turns each planned row into one :class:`FamilyPrompt` and packs them into the batch.
The images' perturbations are applied later, on the batch's device (`data.perturb.apply_perturbations`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from diva_lightning.core.difficulty import DifficultyTable
from diva_lightning.core.seeding import stable_seed
from diva_lightning.data.batch import KIND_CODES, TIER_CODES, FamilyBatch, QuestionBatch
from diva_lightning.data.perturb import PerturbParams
from diva_lightning.data.planner import PlannedPrompt, PlanSettings, plan_families
from diva_lightning.data.schema import QuestionRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyPrompt:
    """One prompt of a family batch with its images, as the batch stores it (one row of its columns)."""

    row: PlannedPrompt
    images: list[Tensor]

    @property
    def is_original(self) -> bool:
        """The unmodified question (a fallback copy of it is not)."""
        return self.row.kind == "original" and self.row.fallback is None

    @property
    def level(self) -> int:
        """The record's intrinsic level for per-level metrics (-1 when it has none; the loader validates it)."""
        level = self.row.record.meta.get("level", -1)
        return level if isinstance(level, int) and not isinstance(level, bool) else -1


def pack_families(prompts: list[FamilyPrompt], meta: dict[str, object]) -> FamilyBatch:
    """The `FamilyBatch` of these prompts, in order; each image keeps its prompt's perturbation."""
    rows = [p.row for p in prompts]
    owned = [(k, img, p.row.perturb or {}) for k, p in enumerate(prompts) for img in p.images]
    return FamilyBatch(
        problems=[row.text for row in rows],
        answers=[row.record.answer for row in rows],
        question_ids=[row.record.id for row in rows],
        family_index=torch.tensor([row.family for row in rows], dtype=torch.long),
        is_original=torch.tensor([p.is_original for p in prompts]),
        difficulty=torch.tensor([row.label for row in rows], dtype=torch.float32),
        question_difficulty=torch.tensor([row.question_difficulty for row in rows], dtype=torch.float32),
        tier=torch.tensor([TIER_CODES[row.tier] for row in rows], dtype=torch.long),
        kind=torch.tensor([KIND_CODES[row.kind] for row in rows], dtype=torch.long),
        level=torch.tensor([p.level for p in prompts], dtype=torch.long),
        images=[img for _, img, _ in owned],
        image_owner=torch.tensor([k for k, _, _ in owned], dtype=torch.long),
        perturb=PerturbParams.from_list([params for _, _, params in owned]),
        meta=dict(meta),
        records=[row.record for row in rows],
    )


class FamilyBuilder:
    """Plans and packs variant families from the live difficulty table.

    Args:
        settings: how variants are planned (the one copy of the plan settings).
        seed: seed of the plans and of the image noise.

    Attributes:
        fallbacks: variants that could not be built as planned (e.g. no paraphrases), counted over the run.
    """

    def __init__(self, settings: PlanSettings, seed: int) -> None:
        self.settings, self.seed = settings, seed
        self.fallbacks = 0
        self._table: DifficultyTable | None = None
        self._warned_fallback: set[str] = set()  # questions whose fallback was already warned about

    def use_difficulty(self, table: DifficultyTable) -> None:
        """Read the questions' difficulties from ``table`` (owned by its caller, e.g. `DifficultyCallback`)."""
        self._table = table

    def difficulties(self, records: list[QuestionRecord]) -> list[float]:
        """The records' current difficulties (the initial one for every question when no table was handed in)."""
        if self._table is None:
            s = self.settings
            log.warning(
                "DivaDataModule: no DifficultyCallback attached a difficulty table; every question stays at "
                "the initial difficulty %.1f (variants are planned from it, but never adapt).", s.d_mid,
            )
            self._table = DifficultyTable(d_min=s.d_min, d_max=s.d_max, initial=s.d_mid)
        return self._table.lookup([r.id for r in records]).tolist()

    def build(self, qb: QuestionBatch, num_variants: int, rank: int) -> FamilyBatch:
        """The family batch of ``qb``: V variants per question, planned from the current difficulties (seeded by
        seed, batch position and rank)."""
        g = torch.Generator().manual_seed(stable_seed("plan", self.seed, qb.position, rank))
        settings = self.settings if num_variants == self.settings.num_variants else replace(
            self.settings, num_variants=num_variants)

        def image_size(b: int) -> tuple[int, int] | None:
            return tuple(qb.images[b][0].shape[-2:]) if qb.images[b] else None  # type: ignore[return-value]

        rows = plan_families(
            qb.records, self.difficulties(qb.records), settings, generator=g, image_size=image_size,
            noise_key=lambda rec, row: stable_seed("perturb", self.seed, qb.position, rec.id, row),
        )
        prompts = [FamilyPrompt(row, qb.images[row.family]) for row in rows]
        meta = {"position": qb.position, "fallbacks": self._count_fallbacks(rows), "padding": qb.padding}
        return pack_families(prompts, meta)

    def _count_fallbacks(self, rows: list[PlannedPrompt]) -> dict[str, int]:
        """Fallbacks of this batch by planned kind; each question's first one is warned about."""
        fallbacks: dict[str, int] = {}
        for row in rows:
            kind = row.fallback_kind
            if kind is None:
                continue
            fallbacks[kind] = fallbacks.get(kind, 0) + 1
            self.fallbacks += 1
            if row.record.id not in self._warned_fallback:
                self._warned_fallback.add(row.record.id)
                log.warning("question %r: planned %s variant cannot be built (%s); using the original prompt "
                            "with delta 0 (warned once per question; counted as data/variant_fallbacks)",
                            row.record.id, kind, row.fallback.split(": ", 1)[1])  # type: ignore[union-attr]
        return fallbacks
