"""`DivaDataModule`: questions in, difficulty-adapted variant families out.

Where each piece of work happens, and why:
- The dataloader yields plain `QuestionBatch`es (B original questions with decoded images). It is cheap and
  deterministic: batch k of pass e is a slice of a permutation seeded by (seed, e).
- `on_before_batch_transfer` (host, at step time) looks the questions' difficulties up, plans V variants each with
  `core.tiers.plan_variants` and applies the text edits. It runs *after* the previous step's difficulty update
  (Lightning prefetches the raw batch one step ahead, but calls this hook right before the step), so the plan
  always uses the current table, as DIVA's closed loop requires.
- `on_after_batch_transfer` (the batch's device) applies the image perturbations with Kornia.

The training stream keeps its position (batches consumed) in `state_dict`, so a resumed run continues with the
next unseen batch instead of restarting the epoch. The stream runs in the main process (num_workers=0 for
training): the work per batch is tiny and it must see the live difficulty table.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from typing_extensions import override

from diva_lightning.core.difficulty import DifficultyTable
from diva_lightning.core.seeding import stable_seed
from diva_lightning.core.tiers import plan_variants, tier_of
from diva_lightning.data.batch import KIND_CODES, TIER_CODES, FamilyBatch, QuestionBatch
from diva_lightning.data.perturb import PerturbParams, params_for, perturb_images
from diva_lightning.data.schema import QuestionRecord, decode_image, load_records
from diva_lightning.data.variants import render_variant
from diva_lightning.data.world import generate_world

log = logging.getLogger(__name__)


@dataclass
class WorldConfig:
    """The embedded procedural world, used when a source is "world"."""

    train_size: int = 2000
    """Number of training questions."""
    val_size: int = 200
    """Number of validation questions (a disjoint split)."""
    test_size: int = 200
    """Number of test questions (a disjoint split)."""
    seed: int = 0
    """Seed of the world generator (independent of the training seed)."""




class _ImageCache:
    """Decodes each record's images once and keeps them as uint8 (4x smaller than float)."""

    def __init__(self, base_dir: Path | None) -> None:
        self.base_dir = base_dir
        self._cache: dict[str, list[Tensor]] = {}

    def get(self, record: QuestionRecord) -> list[Tensor]:
        if record.id not in self._cache:
            imgs = [decode_image(ref, self.base_dir) for ref in record.images]
            self._cache[record.id] = [(img * 255).round().to(torch.uint8) for img in imgs]
        return [img.to(torch.float32) / 255.0 for img in self._cache[record.id]]


class _TrainStream(IterableDataset[QuestionBatch]):
    """Yields this rank's QuestionBatches from the datamodule's current position to the end of the pass."""

    def __init__(self, dm: DivaDataModule) -> None:
        self.dm = dm

    def __len__(self) -> int:
        return self.dm.batches_per_epoch

    def __iter__(self) -> Iterator[QuestionBatch]:
        dm = self.dm
        start = dm.position
        epoch_end = (start // dm.batches_per_epoch + 1) * dm.batches_per_epoch
        for position in range(start, epoch_end):
            yield dm.question_batch(position)


class _ListDataset(Dataset[QuestionBatch]):
    def __init__(self, dm: DivaDataModule, records: list[QuestionRecord], batch_size: int) -> None:
        self.dm, self.records, self.batch_size = dm, records, batch_size

    def __len__(self) -> int:
        return (len(self.records) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> QuestionBatch:
        recs = self.records[i * self.batch_size : (i + 1) * self.batch_size]
        return QuestionBatch(recs, [self.dm.images.get(r) for r in recs], position=i)


def _identity_collate(items: list[QuestionBatch]) -> QuestionBatch:
    return items[0]


class DivaDataModule(pl.LightningDataModule):
    """Emits batches of question families: each original question plus V difficulty-adapted variants.

    Args:
        train_source: "world" (the embedded procedural world) or a .jsonl/.parquet file (design.md section 8).
        val_source: as train_source; "world" uses the world's validation split.
        test_source: as train_source; "world" uses the world's test split; None disables `test`.
        world: sizes and seed of the embedded world.
        questions_per_step: B, questions per optimizer round on each rank.
        num_variants: V, variants per question (0 gives a plain GRPO data stream).
        plan: "tiers" (paper's three-tier plan) or "official" (the authors' target tables).
        band: half-width of the medium tier around d_mid.
        d_mid / d_min / d_max: the difficulty scale (design.md section 3).
        num_generations: G, responses per prompt (linked from the model; used to report the rollout budget).
        val_batch_size: questions per validation batch.
        seed: seed of the question order and the variant plans (linked from `seed_everything`).
        on_error: "raise" (all bad rows reported at once) or "skip" (bad rows skipped and counted, with a warning).
    """

    def __init__(
        self,
        train_source: str = "world",
        val_source: str = "world",
        test_source: str | None = "world",
        world: WorldConfig | None = None,
        questions_per_step: int = 8,
        num_variants: int = 1,
        plan: str = "tiers",
        band: float = 0.5,
        d_mid: float = 5.0,
        d_min: float = 1.0,
        d_max: float = 9.0,
        num_generations: int = 5,
        val_batch_size: int = 32,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        problems = []
        if questions_per_step < 1:
            problems.append(f"questions_per_step must be >= 1, got {questions_per_step}")
        if num_variants < 0:
            problems.append(f"num_variants must be >= 0, got {num_variants}")
        if plan not in ("tiers", "official"):
            problems.append(f"plan must be 'tiers' or 'official', got {plan!r}")
        if not d_min < d_mid < d_max:
            problems.append(f"need d_min < d_mid < d_max, got {d_min}, {d_mid}, {d_max}")
        if on_error not in ("raise", "skip"):
            problems.append(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if problems:
            raise ValueError("DivaDataModule: " + "; ".join(problems))
        self.train_source, self.val_source, self.test_source = train_source, val_source, test_source
        self.world = world or WorldConfig()
        self.questions_per_step = questions_per_step
        self.num_variants = num_variants
        self.plan, self.band = plan, band
        self.d_mid, self.d_min, self.d_max = d_mid, d_min, d_max
        self.num_generations = num_generations
        self.val_batch_size = val_batch_size
        self.seed = seed
        self.on_error = on_error
        self.difficulty_table: DifficultyTable | None = None  # attached by DifficultyCallback
        self.position = 0  # training batches consumed (global step of the data stream)
        self.train_records: list[QuestionRecord] = []
        self.val_records: list[QuestionRecord] = []
        self.test_records: list[QuestionRecord] = []
        self.images = _ImageCache(None)
        self.fallbacks = 0  # variants that could not be built as planned (e.g. no paraphrases): counted, logged

    # ----------------------------------------------------------------------------------------------- loading
    def _load(self, source: str | None, split: str, size: int) -> list[QuestionRecord]:
        if source is None:
            return []
        if source == "world":
            return generate_world(size, seed=self.world.seed, split=split)
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"DivaDataModule: {split} source {source!r} does not exist")
        self.images.base_dir = path.parent
        return load_records(path, on_error=self.on_error)

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.train_records:
            self.train_records = self._load(self.train_source, "train", self.world.train_size)
            if len(self.train_records) < self.questions_per_step * self._world_size:
                raise ValueError(
                    f"DivaDataModule: {len(self.train_records)} training questions cannot fill one step of "
                    f"{self.questions_per_step} questions x {self._world_size} ranks"
                )
            rollouts = (self.num_variants + 1) * self.num_generations
            log.info(
                "DIVA data: %d train questions, B=%d, V=%d, G=%d -> %d rollouts per question",
                len(self.train_records), self.questions_per_step, self.num_variants, self.num_generations,
                rollouts,
            )
        if stage in ("fit", "validate") and not self.val_records:
            self.val_records = self._load(self.val_source, "val", self.world.val_size)
        if stage == "test" and not self.test_records:
            self.test_records = self._load(self.test_source, "test", self.world.test_size)

    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_records) // (self.questions_per_step * self._world_size)

    def question_batch(self, position: int) -> QuestionBatch:
        """The rank's questions for global batch `position` (deterministic in seed, position, rank)."""
        epoch, k = divmod(position, self.batches_per_epoch)
        g = torch.Generator().manual_seed(stable_seed("order", self.seed, epoch))
        order = torch.randperm(len(self.train_records), generator=g)
        per_step = self.questions_per_step * self._world_size
        start = k * per_step + self._rank * self.questions_per_step
        idx = order[start : start + self.questions_per_step].tolist()
        recs = [self.train_records[i] for i in idx]
        return QuestionBatch(recs, [self.images.get(r) for r in recs], position=position)

    # ----------------------------------------------------------------------------------------- dataloaders
    @override
    def train_dataloader(self) -> DataLoader[QuestionBatch]:
        return DataLoader(_TrainStream(self), batch_size=None, num_workers=0)

    @override
    def val_dataloader(self) -> DataLoader[QuestionBatch]:
        return self._list_loader(self.val_records)

    @override
    def test_dataloader(self) -> DataLoader[QuestionBatch]:
        return self._list_loader(self.test_records)

    def _list_loader(self, records: list[QuestionRecord]) -> DataLoader[QuestionBatch]:
        # Each rank evaluates a disjoint strided shard.
        shard = records[self._rank :: self._world_size]
        return DataLoader(_ListDataset(self, shard, self.val_batch_size), batch_size=1,
                          collate_fn=_identity_collate)

    # ---------------------------------------------------------------------------------------- family build
    def _table(self) -> DifficultyTable:
        if self.difficulty_table is None:
            log.warning(
                "DivaDataModule: no DifficultyCallback attached a difficulty table; every question stays at "
                "the initial difficulty %.1f (variants are planned from it, but never adapt).", self.d_mid,
            )
            self.difficulty_table = DifficultyTable(d_min=self.d_min, d_max=self.d_max, initial=self.d_mid)
        return self.difficulty_table

    def build_families(self, qb: QuestionBatch, num_variants: int) -> FamilyBatch:
        """Plan V variants per question from the current difficulties and apply the host-side text edits."""
        difficulties = self._table().lookup([r.id for r in qb.records]).tolist()
        g = torch.Generator().manual_seed(stable_seed("plan", self.seed, qb.position, self._rank))
        problems: list[str] = []
        answers: list[str] = []
        qids: list[str] = []
        fam: list[int] = []
        orig: list[bool] = []
        label: list[float] = []
        qdiff: list[float] = []
        tiers: list[int] = []
        kinds: list[int] = []
        levels: list[int] = []
        images: list[Tensor] = []
        owner: list[int] = []
        perturb: list[dict[str, float]] = []

        def add(rec: QuestionRecord, b: int, d: float, text: str, kind: str, delta: float,
                img_params: dict[str, float] | None) -> None:
            p = len(problems)
            problems.append(text)
            answers.append(rec.answer)
            qids.append(rec.id)
            fam.append(b)
            orig.append(kind == "original")
            label.append(min(max(d + delta, self.d_min), self.d_max))
            qdiff.append(d)
            tiers.append(TIER_CODES[tier_of(d, d_mid=self.d_mid, band=self.band)])
            kinds.append(KIND_CODES[kind])
            levels.append(int(rec.meta.get("level", -1)) if isinstance(rec.meta, dict) else -1)
            for img in qb.images[b]:
                images.append(img)
                owner.append(p)
                perturb.append(img_params or {})

        for b, (rec, d) in enumerate(zip(qb.records, difficulties)):
            add(rec, b, d, rec.problem, "original", 0.0, None)
            if num_variants == 0:
                continue
            specs = plan_variants(
                d, num_variants, plan=self.plan, d_mid=self.d_mid, band=self.band, d_min=self.d_min,
                d_max=self.d_max, num_paraphrases=max(len(rec.variants), 1), generator=g,
            )
            for spec in specs:
                rendered = render_variant(rec, spec)
                text = rendered.prompt
                if rendered.fallback:
                    self.fallbacks += 1
                img_params = None
                if spec.kind == "image" and qb.images[b]:
                    h, w = qb.images[b][0].shape[-2:]
                    img_params = params_for(spec, image_size=(int(h), int(w)))
                    # per-image noise key: the perturbation never depends on batching or sharding
                    img_params["seed"] = stable_seed("perturb", self.seed, qb.position, rec.id, len(problems))
                add(rec, b, d, text, spec.kind, float(spec.delta), img_params)

        return FamilyBatch(
            problems=problems,
            answers=answers,
            question_ids=qids,
            family_index=torch.tensor(fam, dtype=torch.long),
            is_original=torch.tensor(orig, dtype=torch.bool),
            difficulty=torch.tensor(label, dtype=torch.float32),
            question_difficulty=torch.tensor(qdiff, dtype=torch.float32),
            tier=torch.tensor(tiers, dtype=torch.long),
            kind=torch.tensor(kinds, dtype=torch.long),
            level=torch.tensor(levels, dtype=torch.long),
            images=images,
            image_owner=torch.tensor(owner, dtype=torch.long),
            perturb=PerturbParams.from_list(perturb),
            meta={"position": qb.position, "fallbacks": self.fallbacks},
        )

    # --------------------------------------------------------------------------------------------- hooks
    @override
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if not isinstance(batch, QuestionBatch):
            return batch
        training = self.trainer is not None and self.trainer.training
        if training:
            self.position = batch.position + 1
        return self.build_families(batch, self.num_variants if training else 0)

    @override
    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, FamilyBatch):
            batch.images = apply_perturbations(batch.images, batch.perturb)
        return batch

    # ------------------------------------------------------------------------------------------ resumption
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "fallbacks": self.fallbacks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict.get("position", 0))
        self.fallbacks = int(state_dict.get("fallbacks", 0))


def apply_perturbations(images: Sequence[Tensor], params: PerturbParams) -> list[Tensor]:
    """Perturb a flat list of images on their device, batching images of the same shape together.

    Each image's noise is keyed by its own `params.seed`, so grouping never changes a result.
    """
    out = list(images)
    active = (~params.is_identity()).nonzero().flatten().tolist()
    if not active:
        return out
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j in active:
        by_shape.setdefault(tuple(images[j].shape), []).append(j)
    for idx in by_shape.values():
        stacked = torch.stack([images[j] for j in idx])
        sel = torch.tensor(idx, device=params.rotation_deg.device)
        result = perturb_images(stacked, params.select(sel))
        for slot, j in enumerate(idx):
            out[j] = result[slot]
    return out
