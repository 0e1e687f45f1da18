"""The batch of question families that the DataModule emits and the module consumes.

One batch holds P prompts: for each of B questions the original prompt followed by its V variants. Images are
kept as a flat list (a prompt may have zero or several) with `image_owner[j]` the prompt of image j, so records
with differently sized images still batch; the perturbation step groups them by shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from diva_lightning.core.choices import STEP_KINDS, TIERS
from diva_lightning.data.perturb import PerturbParams

# The batch's integer codes: the position of the word in `core.choices` (one source, read back by the monitor).
KIND_CODES = {kind: code for code, kind in enumerate(STEP_KINDS)}
TIER_CODES = {tier: code for code, tier in enumerate(TIERS)}


@dataclass
class FamilyBatch:
    """P prompts grouped into families (original question + its variants).

    Attributes:
        problems: prompt texts after host-side edits (paraphrase, hints, rotation notice), len P.
        answers: ground-truth answer per prompt, len P.
        question_ids: string id of the *original* question of each prompt, len P.
        family_index: int64 [P], 0..B-1, the family (question) of each prompt within this batch.
        is_original: bool [P], True for the unmodified question.
        difficulty: float32 [P], the prompt's own label: question D plus the variant's delta (design.md 2.1).
        question_difficulty: float32 [P], the question's D when the batch was planned.
        tier: int64 [P], codes of TIER_CODES (tier of the question).
        kind: int64 [P], codes of KIND_CODES.
        level: int64 [P], intrinsic level from the record's meta (-1 when unknown), for per-level metrics.
        images: flat list of float [3,H,W] images in [0, 1].
        image_owner: int64 [num_images], prompt index of each image.
        perturb: per-image perturbation parameters (identity for originals and text variants).
        records: the original question's record of each prompt, len P (evaluation scores by it: a benchmark's
            scorer reads its choices, precision, tolerance...).
    """

    problems: list[str]
    answers: list[str]
    question_ids: list[str]
    family_index: Tensor
    is_original: Tensor
    difficulty: Tensor
    question_difficulty: Tensor
    tier: Tensor
    kind: Tensor
    level: Tensor
    images: list[Tensor]
    image_owner: Tensor
    perturb: PerturbParams
    meta: dict[str, Any] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)  # list[QuestionRecord]

    def __len__(self) -> int:
        return len(self.problems)

    @property
    def num_questions(self) -> int:
        return int(self.family_index.max().item()) + 1 if len(self) else 0

    def images_of(self, prompt: int) -> list[Tensor]:
        return [img for img, owner in zip(self.images, self.image_owner.tolist()) if owner == prompt]

    def images_per_prompt(self) -> list[list[Tensor]]:
        out: list[list[Tensor]] = [[] for _ in range(len(self))]
        for img, owner in zip(self.images, self.image_owner.tolist()):
            out[owner].append(img)
        return out

    def to(self, device: torch.device | str) -> FamilyBatch:
        """Lightning calls this in `batch_to_device`; text stays on the host."""
        return replace(
            self,
            family_index=self.family_index.to(device),
            is_original=self.is_original.to(device),
            difficulty=self.difficulty.to(device),
            question_difficulty=self.question_difficulty.to(device),
            tier=self.tier.to(device),
            kind=self.kind.to(device),
            level=self.level.to(device),
            images=[img.to(device) for img in self.images],
            image_owner=self.image_owner.to(device),
            perturb=self.perturb.to(device),
        )


def merge_families(parts: list[tuple[FamilyBatch, list[int]]]) -> FamilyBatch:
    """One batch of the prompts ``rows`` of each part, in order (dynamic sampling's kept groups of several draws).

    Families are renumbered 0..F-1 in order of appearance; images follow their prompts; the parts' ``meta`` are
    kept as a list under ``meta["parts"]``. The caller takes a family's prompts together (whole groups).
    """
    problems: list[str] = []
    answers: list[str] = []
    qids: list[str] = []
    keys = ("is_original", "difficulty", "question_difficulty", "tier", "kind", "level")
    rows_of: dict[str, list[Tensor]] = {k: [] for k in keys}
    family: list[int] = []
    images: list[Tensor] = []
    owner: list[int] = []
    perturb: list[PerturbParams] = []
    for batch, rows in parts:
        first = max(family, default=-1) + 1
        remap = {f: first + k for k, f in enumerate(dict.fromkeys(int(batch.family_index[p]) for p in rows))}
        owners = batch.image_owner.tolist()
        for p in rows:
            new_p = len(problems)
            problems.append(batch.problems[p])
            answers.append(batch.answers[p])
            qids.append(batch.question_ids[p])
            family.append(remap[int(batch.family_index[p])])
            for key in keys:
                rows_of[key].append(getattr(batch, key)[p : p + 1])
            picked = [j for j, o in enumerate(owners) if o == p]
            images.extend(batch.images[j] for j in picked)
            owner.extend([new_p] * len(picked))
            if picked:
                perturb.append(batch.perturb.select(torch.tensor(picked)))
    device = parts[0][0].family_index.device
    return FamilyBatch(
        problems=problems, answers=answers, question_ids=qids,
        family_index=torch.tensor(family, dtype=torch.long, device=device),
        is_original=torch.cat(rows_of["is_original"]), difficulty=torch.cat(rows_of["difficulty"]),
        question_difficulty=torch.cat(rows_of["question_difficulty"]), tier=torch.cat(rows_of["tier"]),
        kind=torch.cat(rows_of["kind"]), level=torch.cat(rows_of["level"]),
        images=images, image_owner=torch.tensor(owner, dtype=torch.long, device=device),
        perturb=PerturbParams.cat(perturb) if perturb else PerturbParams.from_list([], device=device),
        meta={"parts": [b.meta for b, _ in parts]},
    )


@dataclass
class QuestionBatch:
    """What the dataloader yields: B original questions, before variant planning (done at step time)."""

    records: list[Any]  # list[QuestionRecord]
    images: list[list[Tensor]]  # per question, float [3,H,W] in [0,1]
    position: int  # global index of this batch in the stream (for the data position in checkpoints)
    padding: bool = False  # an evaluation batch that only keeps the ranks in step: its results are dropped

    def __len__(self) -> int:
        return len(self.records)
