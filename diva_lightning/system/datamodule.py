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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from diva_lightning.core.difficulty import DifficultyTable
from diva_lightning.core.seeding import stable_seed
from diva_lightning.core.tiers import IMAGE_OPS
from diva_lightning.data.batch import KIND_CODES, TIER_CODES, FamilyBatch, QuestionBatch
from diva_lightning.data.images import MAX_IMAGE_PIXELS, ImageError, ImageStore
from diva_lightning.data.perturb import PerturbParams, perturb_images
from diva_lightning.data.planner import PlanSettings, plan_families
from diva_lightning.data.schema import (
    MAX_FIELD_CHARS,
    LoadReport,
    QuestionRecord,
    RecordError,
    RowProblem,
    load_records_with_report,
)
from diva_lightning.data.skew import SkewConfig, compose, share_counts
from diva_lightning.data.world import FAMILIES, generate_world

log = logging.getLogger(__name__)
DEFAULT_DIFFICULTY = next(f.default for f in fields(QuestionRecord) if f.name == "difficulty")  # a record without one


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
    skew: SkewConfig | None = None
    """Compose each split by the base policy's measured success rate, e.g. {hard: 0.4, easy: 0.4}
    (`data.skew`; null: the world as generated)."""
    families: list[str] | None = None
    """Question families to draw, cycled in this order (null: all of count_color, count_shape, count_plus,
    compare)."""
    levels: list[int] | None = None
    """Intrinsic levels to draw, 1..5 (null: all five)."""

    def check(self) -> list[str]:
        """Problems with this world's settings, one string each (empty when valid)."""
        problems = []
        if min(self.train_size, self.val_size, self.test_size) < 0:
            problems.append(f"world sizes must be >= 0, got {self.train_size}, {self.val_size}, {self.test_size}")
        if self.families is not None:
            unknown = [f for f in self.families if f not in FAMILIES]
            if unknown or not self.families:
                problems.append(f"world.families must be a non-empty list of {', '.join(FAMILIES)}; got "
                                f"{self.families}")
        if self.levels is not None and (not self.levels or any(not 1 <= lv <= 5 for lv in self.levels)):
            problems.append(f"world.levels must be a non-empty list of levels in 1..5; got {self.levels}")
        if self.skew is not None and (self.families is not None or self.levels is not None):
            problems.append("world.skew composes splits from a success table measured on the world as generated (all "
                            "families, levels 1-5): world.families / world.levels would change which question each "
                            "id names; drop them, or drop skew")
        return problems

    def generator_args(self) -> dict[str, Any]:
        """``generate_world`` keyword arguments for this composition (the defaults when unset)."""
        out: dict[str, Any] = {}
        if self.families is not None:
            out["families"] = tuple(self.families)
        if self.levels is not None:
            out["levels"] = tuple(int(lv) for lv in self.levels)
        return out




@dataclass
class Source:
    """One evaluation source: the world's split, a record file, or a benchmark's native file."""

    path: str = "world"
    """"world" (the embedded world's split) or a data file (.jsonl / .parquet, or a benchmark's own format)."""
    benchmark: str | None = None
    """A benchmark reader (mathvista, mathverse, mathvision, olympiadbench, wemath, mmk12) for the file's native
    format and its rule-based scorer; null: our record format, graded by the training reward."""


SourceSpec = str | dict[str, Source] | None


def named_sources(spec: SourceSpec) -> dict[str, Source]:
    """A source setting as {name: Source}: a plain string is one unnamed source (name ""), None is none."""
    if spec is None:
        return {}
    if isinstance(spec, str):
        return {"": Source(path=spec)}
    return {name: (src if isinstance(src, Source) else Source(**src)) for name, src in spec.items()}


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


def eval_shard(num_records: int, batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches as (record indices, padding) pairs.

    Record i belongs to rank i % world_size, and every rank runs the same number of batches: as many as the longest
    shard needs at ``batch_size`` (sharded generation steps all ranks together, so a rank with one batch fewer would
    leave the others waiting). Each shard is split into that many batches of nearly equal size; a rank whose shard
    is shorter than that gets a padding batch (one record, evaluated and dropped) in place of an empty one.
    """
    if num_records == 0:
        return []
    shard = list(range(rank, num_records, world_size))
    longest = -(-num_records // world_size)
    count = -(-longest // batch_size)
    size, extra = divmod(len(shard), count)
    out: list[tuple[list[int], bool]] = []
    start = 0
    for k in range(count):
        n = size + (k < extra)
        out.append((shard[start : start + n], False) if n else ([shard[0] if shard else 0], True))
        start += n
    return out


class _EvalStream(IterableDataset[QuestionBatch]):
    """This rank's batches of one evaluation source (`eval_shard`). Iterable, so Lightning injects no sampler of its
    own (a DistributedSampler would shard the shard again and repeat records to even the ranks out)."""

    def __init__(self, images: ImageStore, records: list[QuestionRecord], batches: list[tuple[list[int], bool]]
                 ) -> None:
        self.images, self.records, self.batches = images, records, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[QuestionBatch]:
        for k, (idx, padding) in enumerate(self.batches):
            recs = [self.records[i] for i in idx]
            yield QuestionBatch(recs, [self.images.get(r) for r in recs], position=k, padding=padding)


class DivaDataModule(pl.LightningDataModule):
    """Emits batches of question families: each original question plus V difficulty-adapted variants.

    Args:
        train_source: "world" (the embedded procedural world) or a .jsonl/.parquet file (design.md section 8).
        val_source: as train_source ("world" uses the world's validation split), or several named sources
            {name: {path, benchmark}} (a benchmark's native file, scored by its own rules): each logs
            `val/<name>/accuracy`, and `val/accuracy` is their mean.
        test_source: as val_source ("world" uses the world's test split); None disables `test`.
        predict_source: what `predict` answers: a record file, or named sources {name: {path, benchmark}} (a
            benchmark's native file); "world" is the world's test split. None: `predict` has nothing to do.
        world: sizes and seed of the embedded world.
        questions_per_step: B, questions per optimizer round on each rank.
        num_variants: V, variants per question (0 gives a plain GRPO data stream).
        plan: "tiers" (paper's three-tier plan), "official" (the authors' target tables), "released" (the
            authors' gen_new_item.py draw for draw: core.released_plan) or "paraphrase" (a paraphrase for every
            question whatever its difficulty: Share-GRPO).
        band: half-width of the medium tier around d_mid.
        d_mid / d_min / d_max: the difficulty scale (design.md section 3).
        intensity_range: (low, high) image-perturbation intensity of easy questions' variants (``plan: tiers``).
        image_ops: image ops the planner may use (records with ``text_in_image: true`` get rotation only).
        num_generations: G, responses per prompt (linked from the model; used to report the rollout budget).
        val_batch_size: questions per evaluation batch (validate, test, predict).
        seed: seed of the question order and the variant plans (linked from `seed_everything`).
        on_error: "raise" (all bad rows of all the stage's files reported at once, before the model loads) or
            "skip" (bad rows skipped and counted by reason, with a warning).
        max_image_pixels: an image with more pixels (width x height) is a bad row (the policy resizes to its own
            budget later; the bound refuses decompression bombs).
        max_field_chars: a text field longer than this is a bad row.
    """

    def __init__(
        self,
        train_source: str = "world",
        val_source: SourceSpec = "world",
        test_source: SourceSpec = "world",
        predict_source: SourceSpec = None,
        world: WorldConfig | None = None,
        questions_per_step: int = 8,
        num_variants: int = 1,
        plan: str = "tiers",
        band: float = 0.5,
        d_mid: float = 5.0,
        d_min: float = 1.0,
        d_max: float = 9.0,
        intensity_range: tuple[float, float] = (0.2, 0.6),
        image_ops: list[str] | None = None,
        num_generations: int = 5,
        val_batch_size: int = 32,
        seed: int = 0,
        on_error: str = "raise",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_field_chars: int = MAX_FIELD_CHARS,
    ) -> None:
        super().__init__()
        self.plan_settings = PlanSettings(
            num_variants=num_variants, plan=plan, band=band, d_mid=d_mid, d_min=d_min, d_max=d_max,
            intensity_range=(float(intensity_range[0]), float(intensity_range[1])),
            image_ops=tuple(image_ops) if image_ops is not None else IMAGE_OPS,
        )
        problems = self.plan_settings.check()
        if questions_per_step < 1:
            problems.append(f"questions_per_step must be >= 1, got {questions_per_step}")
        try:
            self.val_sources, self.test_sources = named_sources(val_source), named_sources(test_source)
            self.predict_sources = named_sources(predict_source)
        except TypeError as err:
            problems.append(f"val_source / test_source / predict_source: {err}")
            self.val_sources, self.test_sources, self.predict_sources = {}, {}, {}
        problems += _check_sources(self.val_sources, "val_source") + _check_sources(self.test_sources, "test_source")
        problems += _check_sources(self.predict_sources, "predict_source")
        if max_image_pixels < 1 or max_field_chars < 1:
            problems.append(f"max_image_pixels and max_field_chars must be >= 1, got {max_image_pixels}, "
                            f"{max_field_chars}")
        if on_error not in ("raise", "skip"):
            problems.append(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        problems += (world or WorldConfig()).check()
        if problems:
            raise ValueError("DivaDataModule: " + "; ".join(problems))
        self.train_source, self.val_source, self.test_source = train_source, val_source, test_source
        self.predict_source = predict_source
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
        self.extra_position = 0  # batches drawn by dynamic sampling (a stream of its own)
        self.max_field_chars = max_field_chars
        self.train_records: list[QuestionRecord] = []
        self.val_sets: dict[str, list[QuestionRecord]] = {}  # per named source ("" for an unnamed one)
        self.test_sets: dict[str, list[QuestionRecord]] = {}
        self.predict_sets: dict[str, list[QuestionRecord]] = {}
        self.images = ImageStore(max_pixels=max_image_pixels)  # decoded images, keyed by (data file, record id)
        self.fallbacks = 0  # variants that could not be built as planned (e.g. no paraphrases): counted, logged
        self._warned_fallback: set[str] = set()  # questions whose fallback was already warned about

    # ----------------------------------------------------------------------------------------------- loading
    @property
    def val_records(self) -> list[QuestionRecord]:
        """Every validation question, source after source."""
        return [r for records in self.val_sets.values() for r in records]

    @property
    def test_records(self) -> list[QuestionRecord]:
        return [r for records in self.test_sets.values() for r in records]

    def _load(self, source: Source, split: str, size: int) -> tuple[list[QuestionRecord], LoadReport | None]:
        """Records of one source, bad rows skipped and reported (the caller raises for all files at once)."""
        if source.path == "world":
            return self._world_split(split, size), None
        path = Path(source.path)
        if not path.exists():
            raise FileNotFoundError(f"DivaDataModule: {split} source {source.path!r} does not exist "
                                    f"(resolved: {path.absolute()})")
        if source.benchmark is not None:
            from diva_lightning.evaluation import get_benchmark

            records, report = get_benchmark(source.benchmark).read(path, on_error="collect")
            records = self._check_images(records, report)
        else:
            # Every image is decoded and checked here, once, into the store; relative paths resolve against the
            # folder of their own file.
            records, report = load_records_with_report(path, on_error="collect", images=self.images,
                                                       max_field_chars=self.max_field_chars)
        return records, report

    def _world_split(self, split: str, size: int) -> list[QuestionRecord]:
        skew = self.world.skew
        if skew is None:
            return generate_world(size, seed=self.world.seed, split=split, **self.world.generator_args())
        from diva_lightning.data.success import table_for

        table = table_for(skew.table)
        where = f"DivaDataModule: world.skew ({split} split, table {skew.table!r})"
        if table.world_seed != self.world.seed or split not in table.pools:
            raise ValueError(f"{where}: the table covers world seed {table.world_seed} with pools {table.pools}; "
                             f"this run asks for seed {self.world.seed}, split {split!r}")
        pool = generate_world(table.pools[split], seed=self.world.seed, split=split)
        records = compose(pool, table, size, skew, seed=f"{self.world.seed}:{split}", where=where)
        counts = share_counts(records)
        log.info("%s split composed by skew: %d hard, %d easy, %d middle (of a pool of %d)", split, counts["hard"],
                 counts["easy"], counts["middle"], len(pool))
        return records

    def _check_images(self, records: list[QuestionRecord], report: LoadReport) -> list[QuestionRecord]:
        """Decode (and cache) a benchmark reader's images now: a bad one is a problem of its row, not a crash at
        the first evaluation batch."""
        kept = []
        for record in records:
            try:
                report.images += len(self.images.get(record))
            except ImageError as err:
                report.problems.append(RowProblem(report.path, record.row or 0, "images", str(err), record.id))
                continue
            kept.append(record)
        report.loaded = len(kept)
        return kept

    def _load_all(self, wanted: list[tuple[str, str, Source, int]]) -> dict[tuple[str, str], list[QuestionRecord]]:
        """Load (split, name, source, world size) sources; all problems of all files raise together (or are
        skipped and counted)."""
        loaded: dict[tuple[str, str], list[QuestionRecord]] = {}
        problems: list[RowProblem] = []
        for split, name, source, size in wanted:
            records, report = self._load(source, split, size)
            loaded[split, name] = records
            if report is not None:
                problems += report.problems
                label = f"{split}/{name}" if name else split
                if not report.skipped:
                    log.info("DIVA data (%s): %s", label, report.summary())
                elif self.on_error == "skip":
                    log.warning("DIVA data (%s): %s (on_error=skip); first problem: %s", label, report.summary(),
                                report.problems[0] if report.problems else "-")
                else:  # the RecordError below lists them
                    log.info("DIVA data (%s): %s (on_error=raise: the run stops)", label,
                             report.summary("rejected"))
        if problems and self.on_error == "raise":
            raise RecordError(problems)
        return loaded

    @override
    def setup(self, stage: str) -> None:
        wanted: list[tuple[str, str, Source, int]] = []
        if stage == "fit" and not self.train_records:
            wanted.append(("train", "", Source(self.train_source), self.world.train_size))
        if stage in ("fit", "validate") and not self.val_sets:
            wanted += [("val", n, src, self.world.val_size) for n, src in self.val_sources.items()]
        if stage == "test" and not self.test_sets:
            wanted += [("test", n, src, self.world.test_size) for n, src in self.test_sources.items()]
        if stage == "predict" and not self.predict_sets:  # "world" answers the world's test split
            wanted += [("predict", n, src, self.world.test_size) for n, src in self.predict_sources.items()]
        loaded = self._load_all(wanted)
        eval_sets = {"val": self.val_sets, "test": self.test_sets, "predict": self.predict_sets}
        for (split, name), records in loaded.items():
            if split == "train":
                self.train_records = records
            else:
                eval_sets[split][name] = records
        if ("train", "") in loaded:
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

    def enforce_prompt_budget(self, longest: Callable[[QuestionRecord, list[tuple[int, int]], bool], int],
                              limit: int, overflow: str) -> int:
        """Report or drop the questions whose longest prompt exceeds ``limit`` tokens, in every loaded set.

        Args:
            longest: (record, image sizes, whether variants are planned) -> its longest prompt in tokens.
            limit: the longest prompt allowed.
            overflow: "error" (one RecordError listing every such question by file, row and id) or "skip"
                (dropped, counted in a warning).
        Returns:
            the number of questions dropped.
        """
        problems: list[RowProblem] = []
        sets: list[tuple[str, dict[str, list[QuestionRecord]]]] = [
            ("train", {"": self.train_records}), ("val", self.val_sets), ("test", self.test_sets)]
        for split, named in sets:
            for name, records in named.items():
                keep = []
                for record in records:
                    n = longest(record, self.images.sizes(record), split == "train" and self.num_variants > 0)
                    if n <= limit:
                        keep.append(record)
                        continue
                    where = record.data_file or f"<{split} {name or 'world'}>"  # records built in code
                    problems.append(RowProblem(where, record.row or 0, "problem", f"its longest prompt (images and "
                                               f"variants included) is {n} tokens, over the limit of {limit}",
                                               record.id))
                named[name] = keep
        self.train_records = sets[0][1][""]
        problems = list(dict.fromkeys(problems))  # a file used for train and val is reported once
        if problems and overflow == "error":
            raise RecordError(problems)
        if self.train_records and len(self.train_records) < self.questions_per_step * self._world_size:
            raise ValueError(f"DivaDataModule: after dropping {len(problems)} too-long question(s), "
                             f"{len(self.train_records)} cannot fill one step of {self.questions_per_step} x "
                             f"{self._world_size} ranks")
        if problems:
            log.warning("DIVA data: skipped %d question(s) whose prompt exceeds %d tokens (prompt_overflow=skip), "
                        "first: %s", len(problems), limit, problems[0])
        return len(problems)

    def initial_difficulties(self) -> dict[str, float]:
        """Starting difficulties of the training questions whose record sets one (other than the default 5):
        `DifficultyCallback` seeds its table with them (docs/data.md: a record's `difficulty` is its initial D)."""
        return {r.id: r.difficulty for r in self.train_records if r.difficulty != DEFAULT_DIFFICULTY}

    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def batches_per_epoch(self) -> int:
        return len(self.train_records) // (self.questions_per_step * self._world_size)

    def question_batch(self, position: int, *, stream: str = "order") -> QuestionBatch:
        """The rank's questions for global batch `position` of a stream (deterministic in seed, stream, position,
        rank): "order" is the training stream; "extra" the questions dynamic sampling draws on top."""
        epoch, k = divmod(position, self.batches_per_epoch)
        g = torch.Generator().manual_seed(stable_seed(stream, self.seed, epoch))
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
    def val_dataloader(self) -> list[DataLoader[QuestionBatch]]:
        """One loader per validation source, in `val_sources` order (`dataloader_idx` names the source)."""
        return [self._list_loader(records) for records in self.val_sets.values()]

    @override
    def test_dataloader(self) -> list[DataLoader[QuestionBatch]]:
        return [self._list_loader(records) for records in self.test_sets.values()]

    @override
    def predict_dataloader(self) -> list[DataLoader[QuestionBatch]]:
        """One loader per `predict_source`, in order (`dataloader_idx` names the source)."""
        return [self._list_loader(records) for records in self.predict_sets.values()]

    def _list_loader(self, records: list[QuestionRecord]) -> DataLoader[QuestionBatch]:
        # Each rank evaluates a disjoint strided shard, in the same number of batches as every other rank.
        batches = eval_shard(len(records), self.val_batch_size, self._rank, self._world_size)
        return DataLoader(_EvalStream(self.images, records, batches), batch_size=None, num_workers=0)

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
        """Plan V variants per question from the current difficulties (`data.planner`) and pack the rows."""
        difficulties = self._table().lookup([r.id for r in qb.records]).tolist()
        g = torch.Generator().manual_seed(stable_seed("plan", self.seed, qb.position, self._rank))
        settings = self.plan_settings if num_variants == self.num_variants else replace(
            self.plan_settings, num_variants=num_variants)

        def image_size(b: int) -> tuple[int, int] | None:
            return tuple(qb.images[b][0].shape[-2:]) if qb.images[b] else None  # type: ignore[return-value]

        rows = plan_families(
            qb.records, difficulties, settings, generator=g, image_size=image_size,
            noise_key=lambda rec, row: stable_seed("perturb", self.seed, qb.position, rec.id, row),
        )
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
        images: list[Tensor] = []
        owner: list[int] = []
        perturb: list[dict[str, float]] = []
        for p, row in enumerate(rows):
            for img in qb.images[row.family]:
                images.append(img)
                owner.append(p)
                perturb.append(row.perturb or {})
        return FamilyBatch(
            problems=[row.text for row in rows],
            answers=[row.record.answer for row in rows],
            question_ids=[row.record.id for row in rows],
            family_index=torch.tensor([row.family for row in rows], dtype=torch.long),
            is_original=torch.tensor([row.kind == "original" and row.fallback is None for row in rows]),
            difficulty=torch.tensor([row.label for row in rows], dtype=torch.float32),
            question_difficulty=torch.tensor([row.question_difficulty for row in rows], dtype=torch.float32),
            tier=torch.tensor([TIER_CODES[row.tier] for row in rows], dtype=torch.long),
            kind=torch.tensor([KIND_CODES[row.kind] for row in rows], dtype=torch.long),
            level=torch.tensor([_level(row.record) for row in rows], dtype=torch.long),
            images=images,
            image_owner=torch.tensor(owner, dtype=torch.long),
            perturb=PerturbParams.from_list(perturb),
            meta={"position": qb.position, "fallbacks": fallbacks, "padding": qb.padding},
            records=[row.record for row in rows],
        )

    def use_difficulty(self, table: DifficultyTable) -> None:
        """The live difficulty table the variants are planned from (handed by `DifficultyCallback.setup`)."""
        self.difficulty_table = table

    @property
    def side_stream(self) -> _SideStream:
        """Dynamic sampling's stream of extra question families (`draw(device)`; see `extra_families`)."""
        return _SideStream(self)

    def extra_families(self, device: torch.device | str) -> FamilyBatch:
        """One more batch of question families for dynamic sampling, ready for the policy (planned, on
        ``device``, images perturbed), from a stream of its own so the training stream's position is untouched.

        Its position (saved with the data module's state, so a resumed run draws the same questions) is kept
        negative in the batch, so its plans and noise never repeat a training batch's.
        """
        qb = self.question_batch(self.extra_position, stream="extra")
        qb = QuestionBatch(qb.records, qb.images, position=-(1 + self.extra_position))
        self.extra_position += 1
        batch = self.build_families(qb, self.num_variants).to(device)
        batch.images = apply_perturbations(batch.images, batch.perturb)
        return batch

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
        return {"position": self.position, "extra_position": self.extra_position, "fallbacks": self.fallbacks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict.get("position", 0))
        self.extra_position = int(state_dict.get("extra_position", 0))
        self.fallbacks = int(state_dict.get("fallbacks", 0))


def _check_sources(sources: dict[str, Source], setting: str) -> list[str]:
    problems = []
    for name, src in sources.items():
        if name and not all(c.isalnum() or c in "_-." for c in name):
            problems.append(f"{setting}: source name {name!r} may hold letters, digits, '_', '-', '.' only")
        if src.benchmark is not None:
            from diva_lightning.evaluation import BENCHMARKS

            if src.benchmark.lower() not in BENCHMARKS:
                problems.append(f"{setting}.{name}: unknown benchmark {src.benchmark!r}; one of "
                                f"{', '.join(BENCHMARKS)}")
            if src.path == "world":
                problems.append(f"{setting}.{name}: a benchmark source needs the path of its file, not 'world'")
    return problems


def _level(record: QuestionRecord) -> int:
    """The record's intrinsic level for per-level metrics (-1 when it has none; the loader validates it)."""
    level = record.meta.get("level", -1)
    return level if isinstance(level, int) and not isinstance(level, bool) else -1


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


class _SideStream:
    """`DivaDataModule.side_stream`: draws `extra_families` (a stand-in until the data module's own stream)."""

    def __init__(self, datamodule: DivaDataModule) -> None:
        self.datamodule = datamodule

    def draw(self, device: torch.device | str) -> FamilyBatch:
        return self.datamodule.extra_families(device)
