"""Where questions come from: the embedded world's settings, named sources, loading them all with one report.

A run names its sources in settings (:class:`WorldConfig`, :class:`Source`, :func:`named_sources`);
:class:`SourceLoader` reads every source of a stage, decodes and checks every image once into an `ImageStore`,
and raises one `RecordError` for all bad rows of all files (``on_error="raise"``) or skips them with a warning
(``on_error="skip"``). :func:`drop_long_prompts` applies the policy's prompt budget to loaded sets.

A benchmark's native format is read by a reader the caller hands in (``read_benchmark``): the readers live in
``diva_lightning.evaluation``, above this library.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diva_lightning.core.choices import OnError
from diva_lightning.data.images import ImageError, ImageStore
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

BenchmarkReader = Callable[[str, Path], tuple[list[QuestionRecord], LoadReport]]
"""(benchmark name, file) -> its records and report, every problem collected (``on_error="collect"``)."""


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

    def split(self, split: str, size: int) -> list[QuestionRecord]:
        """``size`` questions of one split of this world (composed by ``skew`` when set)."""
        skew = self.skew
        if skew is None:
            return generate_world(size, seed=self.seed, split=split, **self.generator_args())
        from diva_lightning.data.success import table_for

        table = table_for(skew.table)
        where = f"DivaDataModule: world.skew ({split} split, table {skew.table!r})"
        if table.world_seed != self.seed or split not in table.pools:
            raise ValueError(f"{where}: the table covers world seed {table.world_seed} with pools {table.pools}; "
                             f"this run asks for seed {self.seed}, split {split!r}")
        pool = generate_world(table.pools[split], seed=self.seed, split=split)
        records = compose(pool, table, size, skew, seed=f"{self.seed}:{split}", where=where)
        counts = share_counts(records)
        log.info("%s split composed by skew: %d hard, %d easy, %d middle (of a pool of %d)", split, counts["hard"],
                 counts["easy"], counts["middle"], len(pool))
        return records


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


def source_problems(sources: dict[str, Source], setting: str, benchmarks: Collection[str]) -> list[str]:
    """Problems with one source setting: names, and benchmarks (one of ``benchmarks``) with a file each."""
    problems = []
    for name, src in sources.items():
        if name and not all(c.isalnum() or c in "_-." for c in name):
            problems.append(f"{setting}: source name {name!r} may hold letters, digits, '_', '-', '.' only")
        if src.benchmark is not None:
            if src.benchmark.lower() not in benchmarks:
                problems.append(f"{setting}.{name}: unknown benchmark {src.benchmark!r}; one of "
                                f"{', '.join(benchmarks)}")
            if src.path == "world":
                problems.append(f"{setting}.{name}: a benchmark source needs the path of its file, not 'world'")
    return problems


@dataclass(frozen=True)
class Wanted:
    """One source a stage needs: its split ("train", "val", "test", "predict"), its name ("" when unnamed), the
    source, and how many questions the world gives it when the source is "world"."""

    split: str
    name: str
    source: Source
    world_size: int


@dataclass
class SourceLoader:
    """Reads sources into records, every image decoded and checked once into ``images``.

    Attributes:
        world: the embedded world ("world" sources).
        images: where decoded images are kept (keyed by data file and record id).
        on_error: "raise" (all bad rows of all files in one `RecordError`) or "skip" (skipped, with a warning).
        max_field_chars: a text field longer than this is a bad row.
        read_benchmark: the reader of benchmark sources (None: a benchmark source is an error).
    """

    world: WorldConfig
    images: ImageStore
    on_error: OnError = "raise"
    max_field_chars: int = MAX_FIELD_CHARS
    read_benchmark: BenchmarkReader | None = None

    def load_all(self, wanted: list[Wanted]) -> dict[tuple[str, str], list[QuestionRecord]]:
        """{(split, name): records} of every wanted source; all problems of all files raise together (or are
        skipped and counted)."""
        loaded: dict[tuple[str, str], list[QuestionRecord]] = {}
        problems: list[RowProblem] = []
        for w in wanted:
            records, report = self.load(w.source, w.split, w.world_size)
            loaded[w.split, w.name] = records
            if report is not None:
                problems += report.problems
                self._log(report, f"{w.split}/{w.name}" if w.name else w.split)
        if problems and self.on_error == "raise":
            raise RecordError(problems)
        return loaded

    def load(self, source: Source, split: str, size: int) -> tuple[list[QuestionRecord], LoadReport | None]:
        """Records of one source, bad rows skipped and reported (the caller raises for all files at once)."""
        if source.path == "world":
            return self.world.split(split, size), None
        path = Path(source.path)
        if not path.exists():
            raise FileNotFoundError(f"DivaDataModule: {split} source {source.path!r} does not exist "
                                    f"(resolved: {path.absolute()})")
        if source.benchmark is not None:
            if self.read_benchmark is None:
                raise ValueError(f"DivaDataModule: {split} source {source.path!r} names benchmark "
                                 f"{source.benchmark!r}, but no benchmark reader was given")
            records, report = self.read_benchmark(source.benchmark, path)
            return self.check_images(records, report), report
        # Every image is decoded and checked here, once, into the store; relative paths resolve against the folder
        # of their own file.
        return load_records_with_report(path, on_error="collect", images=self.images,
                                        max_field_chars=self.max_field_chars)

    def check_images(self, records: list[QuestionRecord], report: LoadReport) -> list[QuestionRecord]:
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

    def _log(self, report: LoadReport, label: str) -> None:
        if not report.skipped:
            log.info("DIVA data (%s): %s", label, report.summary())
        elif self.on_error == "skip":
            log.warning("DIVA data (%s): %s (on_error=skip); first problem: %s", label, report.summary(),
                        report.problems[0] if report.problems else "-")
        else:  # the RecordError of load_all lists them
            log.info("DIVA data (%s): %s (on_error=raise: the run stops)", label, report.summary("rejected"))


PromptLength = Callable[[QuestionRecord, list[tuple[int, int]], bool], int]
"""(record, its image sizes, whether variants are planned) -> its longest prompt in tokens."""


def drop_long_prompts(sets: list[tuple[str, dict[str, list[QuestionRecord]]]], longest: PromptLength, limit: int,
                      images: ImageStore, *, variants: bool) -> list[RowProblem]:
    """Drop, in place, the questions whose longest prompt exceeds ``limit`` tokens from named sets of each split
    [(split, {name: records})], and return one problem per dropped question (a file used by two splits once).
    ``variants``: whether the "train" split's questions get variants planned."""
    problems: list[RowProblem] = []
    for split, named in sets:
        for name, records in named.items():
            keep = []
            for record in records:
                n = longest(record, images.sizes(record), split == "train" and variants)
                if n <= limit:
                    keep.append(record)
                    continue
                where = record.data_file or f"<{split} {name or 'world'}>"  # records built in code
                problems.append(RowProblem(where, record.row or 0, "problem", f"its longest prompt (images and "
                                           f"variants included) is {n} tokens, over the limit of {limit}",
                                           record.id))
            named[name] = keep
    return list(dict.fromkeys(problems))
