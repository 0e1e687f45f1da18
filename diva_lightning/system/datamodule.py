"""`DivaDataModule`: questions in, difficulty-adapted variant families out (the Lightning hooks; the work lives in
the data library: `data.sources`, `data.streams`, `data.families`, `data.side_stream`, `data.perturb`).

Where each piece of work happens, and why:
- The dataloader yields plain `QuestionBatch`es (B original questions with decoded images). It is cheap and
  deterministic: batch k of pass e is a slice of a permutation seeded by (seed, e) (`data.streams.QuestionOrder`).
- `on_before_batch_transfer` (host, at step time) looks the questions' difficulties up, plans V variants each with
  `core.tiers.plan_variants` and applies the text edits (`data.families.FamilyBuilder`). It runs *after* the
  previous step's difficulty update (Lightning prefetches the raw batch one step ahead, but calls this hook right
  before the step), so the plan always uses the current table, as DIVA's closed loop requires.
- `on_after_batch_transfer` (the batch's device) applies the image perturbations with Kornia.

The training stream keeps its position (batches consumed) in `state_dict`, so a resumed run continues with the
next unseen batch instead of restarting the epoch; so does the dynamic-sampling side stream (`side_stream`). The
stream runs in the main process (num_workers=0 for training): the work per batch is tiny and it must see the live
difficulty table, which `DifficultyCallback` owns and hands in through `use_difficulty`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader
from typing_extensions import override

from diva_lightning.core.choices import IMAGE_OPS, ImageOp, OnError, Plan, choice_problems
from diva_lightning.core.difficulty import DEFAULT_DIFFICULTY, DifficultyTable
from diva_lightning.data.batch import FamilyBatch, QuestionBatch
from diva_lightning.data.families import FamilyBuilder
from diva_lightning.data.images import MAX_IMAGE_PIXELS, ImageStore
from diva_lightning.data.perturb import apply_perturbations
from diva_lightning.data.planner import PlanSettings
from diva_lightning.data.schema import MAX_FIELD_CHARS, LoadReport, QuestionRecord, RecordError
from diva_lightning.data.side_stream import SideStream
from diva_lightning.data.sources import (
    PromptLength,
    Source,
    SourceLoader,
    SourceSpec,
    Wanted,
    WorldConfig,
    drop_long_prompts,
    named_sources,
    source_problems,
)
from diva_lightning.data.streams import EvalStream, QuestionOrder, TrainStream, eval_shard

log = logging.getLogger(__name__)


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
        plan: Plan = "tiers",
        band: float = 0.5,
        d_mid: float = DEFAULT_DIFFICULTY,
        d_min: float = 1.0,
        d_max: float = 9.0,
        intensity_range: tuple[float, float] = (0.2, 0.6),
        image_ops: list[ImageOp] | None = None,
        num_generations: int = 5,
        val_batch_size: int = 32,
        seed: int = 0,
        on_error: OnError = "raise",
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_field_chars: int = MAX_FIELD_CHARS,
    ) -> None:
        super().__init__()
        settings = PlanSettings(
            num_variants=num_variants, plan=plan, band=band, d_mid=d_mid, d_min=d_min, d_max=d_max,
            intensity_range=(float(intensity_range[0]), float(intensity_range[1])),
            image_ops=tuple(image_ops) if image_ops is not None else IMAGE_OPS,
        )
        self.world = world or WorldConfig()
        sources, problems = _check_settings(settings, self.world, (val_source, test_source, predict_source),
                                            questions_per_step, on_error, max_image_pixels, max_field_chars)
        if problems:
            raise ValueError("DivaDataModule: " + "; ".join(problems))
        self.val_sources, self.test_sources, self.predict_sources = sources
        self.train_source = train_source
        self.num_generations, self.val_batch_size = num_generations, val_batch_size
        self.val_sets: dict[str, list[QuestionRecord]] = {}  # per named source ("" for an unnamed one)
        self.test_sets: dict[str, list[QuestionRecord]] = {}
        self.predict_sets: dict[str, list[QuestionRecord]] = {}
        self.images = ImageStore(max_pixels=max_image_pixels)  # decoded images, keyed by (data file, record id)
        self.loader = SourceLoader(self.world, self.images, on_error, max_field_chars, _read_benchmark)
        self.order = QuestionOrder(self.images, questions_per_step, seed)
        self.families = FamilyBuilder(settings, seed)
        self.side_stream = SideStream(lambda p: self.question_batch(p, stream="extra"),
                                      lambda qb: self.build_families(qb, self.num_variants))
        self.position = 0  # training batches consumed (global step of the data stream)

    # ------------------------------------------------------------------------------------------- settings
    @property
    def plan_settings(self) -> PlanSettings:
        """How variants are planned (the one copy of the plan settings, in `families`)."""
        return self.families.settings

    @property
    def num_variants(self) -> int:
        return self.plan_settings.num_variants

    @property
    def questions_per_step(self) -> int:
        return self.order.per_rank

    @property
    def seed(self) -> int:
        return self.order.seed

    @property
    def fallbacks(self) -> int:
        """Variants that could not be built as planned (e.g. no paraphrases): counted, logged."""
        return self.families.fallbacks

    def use_difficulty(self, table: DifficultyTable) -> None:
        """Plan variants from ``table``'s live difficulties (`DifficultyCallback` owns and checkpoints it)."""
        self.families.use_difficulty(table)

    # -------------------------------------------------------------------------------------------- loading
    @property
    def train_records(self) -> list[QuestionRecord]:
        return self.order.records

    @property
    def val_records(self) -> list[QuestionRecord]:
        """Every validation question, source after source."""
        return [r for records in self.val_sets.values() for r in records]

    @property
    def test_records(self) -> list[QuestionRecord]:
        return [r for records in self.test_sets.values() for r in records]

    @override
    def setup(self, stage: str) -> None:
        w = self.world
        wanted: list[Wanted] = []
        if stage == "fit" and not self.train_records:
            wanted.append(Wanted("train", "", Source(self.train_source), w.train_size))
        if stage in ("fit", "validate") and not self.val_sets:
            wanted += [Wanted("val", n, src, w.val_size) for n, src in self.val_sources.items()]
        if stage == "test" and not self.test_sets:
            wanted += [Wanted("test", n, src, w.test_size) for n, src in self.test_sources.items()]
        if stage == "predict" and not self.predict_sets:  # "world" answers the world's test split
            wanted += [Wanted("predict", n, src, w.test_size) for n, src in self.predict_sources.items()]
        loaded = self.loader.load_all(wanted)
        eval_sets = {"val": self.val_sets, "test": self.test_sets, "predict": self.predict_sets}
        for (split, name), records in loaded.items():
            if split == "train":
                self.order.records = records
            else:
                eval_sets[split][name] = records
        if ("train", "") in loaded:
            self._check_one_step()
            log.info("DIVA data: %d train questions, B=%d, V=%d, G=%d -> %d rollouts per question",
                     len(self.train_records), self.questions_per_step, self.num_variants, self.num_generations,
                     (self.num_variants + 1) * self.num_generations)

    def _check_one_step(self, after: str = "") -> None:
        if len(self.train_records) < self.questions_per_step * self._world_size:
            raise ValueError(f"DivaDataModule: {after}{len(self.train_records)} training questions cannot fill one "
                             f"step of {self.questions_per_step} questions x {self._world_size} ranks")

    def enforce_prompt_budget(self, longest: PromptLength, limit: int, overflow: str) -> int:
        """Report or drop the questions whose longest prompt exceeds ``limit`` tokens, in every loaded set.

        Args:
            longest: (record, image sizes, whether variants are planned) -> its longest prompt in tokens.
            limit: the longest prompt allowed.
            overflow: "skip" (dropped, counted in a warning); otherwise ("raise") one
                RecordError listing every such question by file, row and id.
        Returns:
            the number of questions dropped.
        """
        train = {"": self.train_records}
        problems = drop_long_prompts([("train", train), ("val", self.val_sets), ("test", self.test_sets)],
                                     longest, limit, self.images, variants=self.num_variants > 0)
        self.order.records = train[""]
        if problems and overflow != "skip":
            raise RecordError(problems)
        if self.train_records:
            self._check_one_step(f"after dropping {len(problems)} too-long question(s), ")
        if problems:
            log.warning("DIVA data: skipped %d question(s) whose prompt exceeds %d tokens (prompt_overflow=skip), "
                        "first: %s", len(problems), limit, problems[0])
        return len(problems)

    def initial_difficulties(self) -> dict[str, float]:
        """Starting difficulties of the training questions whose record sets one (other than the default 5):
        `DifficultyCallback` seeds its table with them (docs/data.md: a record's `difficulty` is its initial D)."""
        return {r.id: r.difficulty for r in self.train_records if r.difficulty != DEFAULT_DIFFICULTY}

    # ---------------------------------------------------------------------------------------------- streams
    @property
    def _world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def batches_per_epoch(self) -> int:
        return self.order.batches_per_epoch(self._world_size)

    def question_batch(self, position: int, *, stream: str = "order") -> QuestionBatch:
        """The rank's questions for global batch `position` of a stream (deterministic in seed, stream, position,
        rank): "order" is the training stream; "extra" the questions dynamic sampling draws on top."""
        return self.order.batch(position, rank=self._rank, world_size=self._world_size, stream=stream)

    def build_families(self, qb: QuestionBatch, num_variants: int) -> FamilyBatch:
        """Plan V variants per question from the current difficulties (`data.families`) and pack the rows."""
        return self.families.build(qb, num_variants, self._rank)

    @override
    def train_dataloader(self) -> DataLoader[QuestionBatch]:
        stream = TrainStream(self.question_batch, lambda: self.position, lambda: self.batches_per_epoch)
        return DataLoader(stream, batch_size=None, num_workers=0)

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
        return DataLoader(EvalStream(self.images, records, batches), batch_size=None, num_workers=0)

    # ------------------------------------------------------------------------------------------------ hooks
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

    @override
    def state_dict(self) -> dict[str, Any]:
        """The streams' positions and the fallback count (the difficulty table is the callback's to save)."""
        return {"position": self.position, "extra_position": self.side_stream.position, "fallbacks": self.fallbacks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.position = int(state_dict.get("position", 0))
        self.side_stream.position = int(state_dict.get("extra_position", 0))
        self.families.fallbacks = int(state_dict.get("fallbacks", 0))


def _check_settings(settings: PlanSettings, world: WorldConfig, specs: tuple[SourceSpec, SourceSpec, SourceSpec],
                    questions_per_step: int, on_error: str, max_image_pixels: int, max_field_chars: int
                    ) -> tuple[tuple[dict[str, Source], ...], list[str]]:
    """The named (val, test, predict) sources and every problem with the data module's settings."""
    problems = settings.check()
    if questions_per_step < 1:
        problems.append(f"questions_per_step must be >= 1, got {questions_per_step}")
    try:
        sources = tuple(named_sources(spec) for spec in specs)
    except TypeError as err:
        problems.append(f"val_source / test_source / predict_source: {err}")
        sources = ({}, {}, {})
    for setting, named in zip(("val_source", "test_source", "predict_source"), sources):
        problems += source_problems(named, setting, _benchmark_names(named))
    if max_image_pixels < 1 or max_field_chars < 1:
        problems.append(f"max_image_pixels and max_field_chars must be >= 1, got {max_image_pixels}, "
                        f"{max_field_chars}")
    problems += choice_problems("on_error", on_error, OnError)
    return sources, problems + world.check()


def _benchmark_names(sources: dict[str, Source]) -> tuple[str, ...]:
    """The benchmarks a source may name (the evaluation package is imported only when a source names one)."""
    if all(src.benchmark is None for src in sources.values()):
        return ()
    from diva_lightning.evaluation import BENCHMARKS

    return tuple(BENCHMARKS)


def _read_benchmark(name: str, path: Path) -> tuple[list[QuestionRecord], LoadReport]:
    from diva_lightning.evaluation import get_benchmark

    return get_benchmark(name).read(path, on_error="collect")

