"""What every benchmark shares: reading native rows, validating them all at once, and averaging scores.

A benchmark module supplies three pure functions and :class:`Benchmark` does the rest:

- ``convert(row: Row) -> QuestionRecord | None``: one native row to a record. It reads fields through the
  :class:`Row` getters, which record a problem (file, row, *native* field, message) instead of raising, so a
  file with ten bad rows reports ten problems in one error.
- ``score(record, response) -> float``: one sampled response graded 0..1 by the benchmark's rules.
- ``metrics(records, mean_score_by_id) -> dict``: the benchmark's metric dict from per-row mean scores
  (several samples of one row are averaged first: mean@k).

Native files: ``.json`` (a list of rows, or an object of rows keyed by id as MathVista's ``testmini.json``),
``.jsonl`` (one row per line), ``.parquet`` (HF datasets export; images as ``{"bytes", "path"}`` structs).
Rows are numbered from 1: the line for JSONL, the position for JSON and parquet. Image paths are resolved
against the data file's directory and stored absolute, so records do not depend on the working directory.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from PIL import Image, UnidentifiedImageError

from diva_lightning.core.choices import ReadMode, check_choice
from diva_lightning.data.schema import (
    IMAGE_TAG,
    ImageRef,
    LoadReport,
    QuestionRecord,
    RecordError,
    RowProblem,
    decode_text,
    jsonl_rows,
)

logger = logging.getLogger(__name__)

NativeRow = tuple[int, dict[str, Any] | None, str | None]  # (row number, row or None, syntax problem or None)


def _type_name(value: object) -> str:
    return type(value).__name__


def _image_bytes_ok(data: bytes) -> bool:
    """True when PIL recognises the bytes as an image (reads the header only)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format is not None
    except (UnidentifiedImageError, OSError):
        return False


class Row:
    """One native row under validation. Getters return None and record a problem when a field is bad."""

    def __init__(self, data: Mapping[str, Any], base_dir: Path) -> None:
        self.data = data
        self.base_dir = base_dir
        self.problems: list[tuple[str, str]] = []

    def bad(self, field: str, message: str) -> None:
        self.problems.append((field, message))

    def has(self, field: str) -> bool:
        return self.data.get(field) is not None

    def text(self, field: str, *, required: bool = True, numbers: bool = False) -> str | None:
        """A string field; ``numbers=True`` also accepts an int (ids, numeric answers) as its decimal text."""
        value = self.data.get(field)
        if value is None:
            if required:
                self.bad(field, "missing required field")
            return None
        if numbers and isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            self.bad(field, f"expected a string, got {_type_name(value)}")
            return None
        return value

    def one_of(self, field: str, allowed: Sequence[str]) -> str | None:
        value = self.text(field)
        if value is not None and value not in allowed:
            self.bad(field, f"{value!r} is not one of {', '.join(map(repr, allowed))}")
            return None
        return value

    def integer(self, field: str, *, required: bool = True) -> int | None:
        """An int field (parquet stores a nullable int column as float: 2.0 is accepted as 2)."""
        value = self.data.get(field)
        if value is None:
            if required:
                self.bad(field, "missing required field")
            return None
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.bad(field, f"expected an integer, got {value!r}")
            return None
        return value

    def flag(self, field: str) -> bool:
        """A boolean field; absent means False."""
        value = self.data.get(field)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.bad(field, f"expected true or false, got {value!r}")
            return False
        return value

    def str_list(self, field: str, *, required: bool = True) -> list[str] | None:
        value = self.data.get(field)
        if value is None:
            if required:
                self.bad(field, "missing required field")
            return None
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            self.bad(field, f"expected a list of strings, got {_type_name(value)}")
            return None
        return list(value)

    def mapping(self, field: str) -> dict[str, Any]:
        """An optional object field (``metadata``); absent means {}."""
        value = self.data.get(field)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(field, f"expected an object, got {_type_name(value)}")
            return {}
        return dict(value)

    def image(self, field: str, *, required: bool = True) -> ImageRef | None:
        """An image: a path relative to the data file, encoded bytes, or an HF ``{"bytes", "path"}`` dict
        (bytes win). Paths are returned absolute; bytes are checked to be an image PIL can read."""
        value = self.data.get(field)
        if value is None:
            if required:
                self.bad(field, "missing required image")
            return None
        return self._image_value(field, value)

    def image_list(self, field: str) -> list[ImageRef] | None:
        """A list of images (a single image is a list of one), each as :meth:`image` reads it."""
        value = self.data.get(field)
        if value is None:
            self.bad(field, "missing required image")
            return None
        items = list(value) if isinstance(value, list | tuple) else [value]
        refs = [self._image_value(field, item, k) for k, item in enumerate(items)]
        return None if any(r is None for r in refs) else [r for r in refs if r is not None]

    def _image_value(self, field: str, value: Any, item: int | None = None) -> ImageRef | None:
        where = "" if item is None else f"item {item}: "
        if isinstance(value, dict):
            value = value.get("bytes") if value.get("bytes") is not None else value.get("path")
        if isinstance(value, bytes | bytearray):
            if not _image_bytes_ok(bytes(value)):
                self.bad(field, f"{where}bytes are not an image PIL can read")
                return None
            return bytes(value)
        if isinstance(value, str):
            return self.image_file(field, value, where)
        self.bad(field, f"{where}expected an image path or bytes, got {_type_name(value)}")
        return None

    def image_file(self, field: str, relative: str, where: str = "") -> str | None:
        path = Path(relative) if Path(relative).is_absolute() else self.base_dir / relative
        if not path.is_file():
            self.bad(field, f"{where}image file not found: {path}")
            return None
        return str(path.resolve())


def place_single_image(text: str) -> str:
    """Put the one ``<image>`` tag of a single-image question first, as the official DIVA data does."""
    return text if IMAGE_TAG in text else f"{IMAGE_TAG}\n{text}"


# --------------------------------------------------------------------------------------------- native files
def _json_rows(path: Path) -> Iterator[NativeRow]:
    try:
        data = json.loads(decode_text(path.read_bytes(), path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if isinstance(data, dict):  # MathVista's testmini.json: {pid: row}
        data = list(data.values())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of rows or an object of rows, got {_type_name(data)}")
    for n, obj in enumerate(data, start=1):
        yield (n, obj, None) if isinstance(obj, dict) else (n, None, f"expected an object, got {_type_name(obj)}")


def _parquet_rows(path: Path) -> Iterator[NativeRow]:
    import pyarrow.parquet as pq

    for n, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield n, row, None


def native_rows(path: Path) -> Iterator[NativeRow]:
    """The rows of a benchmark file (.json, .jsonl or .parquet)."""
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file not found: {path}")
    readers = {".json": _json_rows, ".jsonl": jsonl_rows, ".parquet": _parquet_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .json, .jsonl or .parquet)")
    return reader(path)


# ----------------------------------------------------------------------------------------------- benchmark
ConvertFn = Callable[[Row], QuestionRecord | None]
ScoreFn = Callable[[QuestionRecord, str], float]
MetricsFn = Callable[[Sequence[QuestionRecord], Mapping[str, float]], dict[str, float]]
# Checks across rows (WeMath's composite problems): kept (row, record) pairs -> (row, field, message) problems.
CrossRowCheck = Callable[[Sequence[tuple[int, QuestionRecord]]], list[tuple[int, str, str]]]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark: its reader, its per-response scorer and its metrics (see the module docstring)."""

    name: str
    title: str
    id_field: str
    convert: ConvertFn
    scorer: ScoreFn
    metrics: MetricsFn
    cross_row_check: CrossRowCheck | None = None
    headline: str = "accuracy"
    """The metric a one-number-per-benchmark table (Table 1) shows."""

    def read(self, path: str | Path, on_error: ReadMode = "raise") -> tuple[list[QuestionRecord], LoadReport]:
        """Read a native benchmark file into records; bad rows raise :class:`RecordError` listing every
        problem (``on_error="raise"``) or are dropped and counted in the report (``"skip"``: and logged;
        ``"collect"``: not logged)."""
        check_choice("on_error", on_error, ReadMode)
        path = Path(path)
        report = LoadReport(path=str(path))
        kept: list[tuple[int, QuestionRecord]] = []
        first_row_of: dict[str, int] = {}
        for n, data, syntax in native_rows(path):
            report.rows += 1
            if data is None:
                report.problems.append(RowProblem(str(path), n, "<row>", syntax or "unreadable row"))
                continue
            row = Row(data, path.parent)
            record = self.convert(row)
            if record is not None and record.id in first_row_of:
                row.bad(self.id_field, f"duplicate id {record.id!r} (first seen in row {first_row_of[record.id]})")
            report.problems.extend(RowProblem(str(path), n, f, m) for f, m in row.problems)
            if record is not None and not row.problems:
                first_row_of[record.id] = n
                record.row = n
                kept.append((n, record))
        if self.cross_row_check is not None:
            cross = self.cross_row_check(kept)
            report.problems.extend(RowProblem(str(path), n, f, m) for n, f, m in cross)
            dropped = {n for n, _, _ in cross}
            kept = [(n, r) for n, r in kept if n not in dropped]
        report.problems.sort(key=lambda p: p.row)
        records = [r for _, r in kept]
        report.loaded = len(records)
        if report.problems and on_error == "raise":
            raise RecordError(report.problems)
        if report.skipped and on_error == "skip":  # "collect": the caller reports them
            logger.warning("%s", describe_load(self.name, report))
        return records, report

    def score(self, record: QuestionRecord, response: str) -> float:
        """Correctness of one sampled response, 0..1."""
        return float(self.scorer(record, response))

    def aggregate(self, records: Sequence[QuestionRecord],
                  per_record_scores: Mapping[str, Sequence[float]]) -> dict[str, float]:
        """The benchmark's metrics; each record's samples are averaged first (mean@k).

        Every record needs at least one score and every scored id must be a record (ValueError otherwise).
        """
        return self.metrics(records, mean_scores(records, per_record_scores))


def _preview(ids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f", ... ({len(ids) - limit} more)" if len(ids) > limit else "")


def mean_scores(records: Sequence[QuestionRecord], per_record_scores: Mapping[str, Sequence[float]]
                ) -> dict[str, float]:
    """Per-record mean of the sample scores, checking that ids match exactly."""
    ids = {r.id for r in records}
    missing = [r.id for r in records if not per_record_scores.get(r.id)]
    unknown = sorted(set(per_record_scores) - ids)
    errors = []
    if missing:
        errors.append(f"{len(missing)} record(s) without a score: {_preview(missing)}")
    if unknown:
        errors.append(f"{len(unknown)} scored id(s) that are not records: {_preview(unknown)}")
    if errors:
        raise ValueError("; ".join(errors))
    means = {r.id: fmean(per_record_scores[r.id]) for r in records}
    bad = [i for i, v in means.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ValueError(f"scores must lie in [0, 1]; not so for {_preview(bad)}")
    return means


def accuracy_by(records: Sequence[QuestionRecord], means: Mapping[str, float],
                group: Callable[[QuestionRecord], str] | None = None) -> dict[str, float]:
    """``{"accuracy": overall}`` plus ``accuracy/<group>`` for each group value when ``group`` is given."""
    if not records:
        raise ValueError("no records to aggregate")
    out = {"accuracy": fmean(means[r.id] for r in records)}
    if group is not None:
        buckets: dict[str, list[float]] = {}
        for r in records:
            buckets.setdefault(group(r), []).append(means[r.id])
        out.update({f"accuracy/{g}": fmean(v) for g, v in sorted(buckets.items())})
    return out


def describe_load(name: str, report: LoadReport) -> str:
    """One line for the user: what was loaded from where, and what was skipped, by reason."""
    line = f"{name}: loaded {report.loaded} question(s) from {report.path}"
    if not report.skipped:
        return line + " (none skipped)"
    first_by_row: dict[int, RowProblem] = {}
    for p in report.problems:
        first_by_row.setdefault(p.row, p)
    reasons = Counter(f"bad field '{p.field}'" if p.field != "<row>" else "unreadable row"
                      for p in first_by_row.values())
    by_reason = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
    return f"{line}; skipped {report.skipped} row(s) ({by_reason})"
