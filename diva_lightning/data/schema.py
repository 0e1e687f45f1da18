"""The question record (design.md section 8) and its JSONL / parquet reader and writer.

A data file holds one question per row with the fields of :class:`QuestionRecord`. Every row is
validated up front and *all* problems are reported together, each as
``file:row N: field 'x': what is wrong`` (rows are 1-based: the line number for JSONL, the row
index + 1 for parquet). Either the whole load fails with :class:`RecordError`
(``on_error="raise"``) or the bad rows are skipped, counted in a :class:`LoadReport` and logged as a
warning (``on_error="skip"``); nothing is dropped silently.

Compatibility with the official DIVA data: the official field names ``variant`` (paraphrases) and
``step2`` (think steps) are read as ``variants`` / ``think_steps`` when the canonical name is absent,
and an image may be a HF-datasets style dict ``{"bytes": ..., "path": ...}`` (also as a single image
rather than a list). Integer ids and numeric answers are converted to ``str``. Any other field is
kept in ``meta`` and written back as a top-level field.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
ANSWER_TYPES = ("choice", "integer", "float", "expression", "text")
D_MIN, D_MAX = 1.0, 9.0
# Canonical field -> official DIVA field name accepted as an alias when reading.
_ALIASES = {"variants": "variant", "think_steps": "step2"}
_FIELDS = ("id", "problem", "answer", "images", "difficulty", "variants", "think_steps", "answer_type")
# Leading bytes of the image formats PIL decodes that we accept inline.
_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpg", b"GIF8": "gif", b"BM": "bmp"}

ImageRef = str | bytes
OnError = Literal["raise", "skip"]


@dataclass
class QuestionRecord:
    """One question. ``images`` are paths relative to the data file (or absolute) or encoded bytes;
    ``problem`` holds one ``<image>`` tag per image."""

    id: str
    problem: str
    answer: str
    images: list[ImageRef] = field(default_factory=list)
    difficulty: float = 5.0
    variants: list[str] = field(default_factory=list)
    think_steps: list[str] = field(default_factory=list)
    answer_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RowProblem:
    """One validation problem: ``row`` is 1-based, ``field`` is ``'<row>'`` for row-level problems."""

    file: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:row {self.row}: field '{self.field}': {self.message}"


@dataclass
class LoadReport:
    """What a load did: rows seen, records returned, and every problem found (skip mode)."""

    path: str
    rows: int = 0
    loaded: int = 0
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        """Number of rows dropped (a row with several problems counts once)."""
        return self.rows - self.loaded


class RecordError(ValueError):
    """Raised with every problem of a data file, one per line."""

    def __init__(self, problems: list[RowProblem]) -> None:
        self.problems = problems
        lines = "\n".join(str(p) for p in problems)
        super().__init__(f"{len(problems)} problem(s) in record file:\n{lines}")


def _image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC.items() if data.startswith(magic)), None)


def _type_name(value: object) -> str:
    return type(value).__name__


def _str_list(value: object, name: str, bad: list[tuple[str, str]]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        bad.append((name, f"expected a list of strings, got {_type_name(value)}"))
        return []
    return list(value)


def _images(value: object, base_dir: Path, inline: bool, bad: list[tuple[str, str]]) -> list[ImageRef]:
    if value is None:
        return []
    if isinstance(value, str | bytes | dict):  # official data stores a single image
        value = [value]
    if not isinstance(value, list | tuple):
        bad.append(("images", f"expected a list of paths or bytes, got {_type_name(value)}"))
        return []
    out: list[ImageRef] = []
    for k, item in enumerate(value):
        if isinstance(item, dict):  # HF datasets Image feature: bytes win over path
            item = item.get("bytes") if item.get("bytes") is not None else item.get("path")
        if isinstance(item, bytes | bytearray):
            if _image_format(bytes(item)) is None:
                bad.append(("images", f"item {k}: bytes are not a PNG/JPEG/GIF/BMP/WebP image"))
            out.append(bytes(item))
        elif isinstance(item, str):
            path = base_dir / item
            if not path.is_file():
                bad.append(("images", f"item {k}: image file not found: {path}"))
            out.append(path.read_bytes() if inline and path.is_file() else item)
        else:
            bad.append(("images", f"item {k}: expected a path or bytes, got {_type_name(item)}"))
    return out


def record_from_row(row: dict[str, Any], base_dir: Path, *, inline_images: bool = False
                    ) -> tuple[QuestionRecord | None, list[tuple[str, str]]]:
    """Validate one row. Returns the record (None when invalid) and a list of (field, problem)."""
    bad: list[tuple[str, str]] = []
    row = dict(row)
    for canon, alias in _ALIASES.items():
        if canon not in row and alias in row:
            row[canon] = row.pop(alias)

    def text(name: str, allow_numbers: bool) -> str | None:
        value = row.get(name)
        if value is None:
            bad.append((name, "missing required field"))
            return None
        if allow_numbers and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            bad.append((name, f"expected a string, got {_type_name(value)}"))
            return None
        return value

    rid = text("id", allow_numbers=True)
    problem = text("problem", allow_numbers=False)
    answer = text("answer", allow_numbers=True)
    images = _images(row.get("images"), base_dir, inline_images, bad)
    variants = _str_list(row.get("variants"), "variants", bad)
    think_steps = _str_list(row.get("think_steps"), "think_steps", bad)

    n_tags = problem.count(IMAGE_TAG) if problem is not None else len(images)
    if n_tags != len(images):
        bad.append(("problem", f"has {n_tags} '{IMAGE_TAG}' tag(s) but the row has {len(images)} image(s)"))
    for k, variant in enumerate(variants):
        # A paraphrase replaces the problem in a prompt, so it must place the same images.
        if variant.count(IMAGE_TAG) != len(images):
            bad.append(("variants", f"item {k} has {variant.count(IMAGE_TAG)} '{IMAGE_TAG}' tag(s), "
                                    f"expected {len(images)}"))

    difficulty = row.get("difficulty")
    if difficulty is None:
        difficulty = 5.0
    elif isinstance(difficulty, bool) or not isinstance(difficulty, int | float):
        bad.append(("difficulty", f"expected a number, got {_type_name(difficulty)}"))
    elif not math.isfinite(difficulty) or not D_MIN <= difficulty <= D_MAX:
        bad.append(("difficulty", f"{difficulty} is not a finite number in [{D_MIN:g}, {D_MAX:g}]"))

    answer_type = row.get("answer_type")
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        bad.append(("answer_type", f"{answer_type!r} is not one of {', '.join(ANSWER_TYPES)}"))

    if bad or rid is None or problem is None or answer is None:
        return None, bad
    meta = {k: v for k, v in row.items() if k not in _FIELDS}
    return QuestionRecord(rid, problem, answer, images, float(difficulty), variants, think_steps,
                          answer_type, meta), bad


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """Yield (1-based line number, parsed object or None, syntax problem or None); skips blank lines."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, None, f"invalid JSON: {e.msg} at column {e.colno}"
                continue
            if not isinstance(obj, dict):
                yield n, None, f"expected a JSON object, got {_type_name(obj)}"
            else:
                yield n, obj, None


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    import pyarrow.parquet as pq

    for n, row in enumerate(pq.read_table(path).to_pylist(), start=1):
        # Parquet is columnar: a field absent from a row reads back as null, so nulls in extra
        # columns mean "absent" (known fields treat null as their default).
        yield n, {k: v for k, v in row.items() if v is not None or k in _FIELDS}, None


def load_records_with_report(path: str | Path, *, on_error: OnError = "raise", inline_images: bool = False
                             ) -> tuple[list[QuestionRecord], LoadReport]:
    """Read a ``.jsonl`` or ``.parquet`` record file.

    Args:
        path: the data file; relative image paths are resolved against its directory.
        on_error: ``"raise"``: any problem raises :class:`RecordError` listing all of them.
            ``"skip"``: bad rows are dropped, counted in the report and logged as one warning.
        inline_images: read image files into bytes (so records no longer depend on the directory).

    Returns:
        The valid records in file order and a :class:`LoadReport`.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterable[tuple[int, dict[str, Any] | None, str | None]] = _jsonl_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ValueError(f"{path}: unsupported record file type {suffix!r} (use .jsonl or .parquet)")

    report = LoadReport(path=str(path))
    records: list[QuestionRecord] = []
    first_row_of: dict[str, int] = {}
    for n, obj, syntax in rows:
        report.rows += 1
        if obj is None:
            report.problems.append(RowProblem(str(path), n, "<row>", syntax or "unreadable row"))
            continue
        record, bad = record_from_row(obj, path.parent, inline_images=inline_images)
        if record is not None and record.id in first_row_of:
            bad.append(("id", f"duplicate id {record.id!r} (first seen in row {first_row_of[record.id]})"))
        report.problems.extend(RowProblem(str(path), n, f, m) for f, m in bad)
        if record is not None and not bad:
            first_row_of[record.id] = n
            records.append(record)
    report.loaded = len(records)

    if report.problems and on_error == "raise":
        raise RecordError(report.problems)
    if report.skipped:
        logger.warning("%s: skipped %d of %d rows (%d problems), first: %s", path, report.skipped,
                       report.rows, len(report.problems), report.problems[0])
    return records, report


def load_records(path: str | Path, *, on_error: OnError = "raise", inline_images: bool = False
                 ) -> list[QuestionRecord]:
    """:func:`load_records_with_report` without the report (skips are still logged as a warning)."""
    return load_records_with_report(path, on_error=on_error, inline_images=inline_images)[0]


def _row_dict(record: QuestionRecord, images: list[Any]) -> dict[str, Any]:
    clash = sorted(set(record.meta) & (set(_FIELDS) | set(_ALIASES.values())))
    if clash:
        raise ValueError(f"record {record.id!r}: meta keys {clash} clash with record fields")
    row: dict[str, Any] = {"id": record.id, "problem": record.problem, "answer": record.answer,
                           "images": images, "difficulty": record.difficulty,
                           "variants": record.variants, "think_steps": record.think_steps,
                           "answer_type": record.answer_type}
    row.update(record.meta)
    return row


def write_records(records: Iterable[QuestionRecord], path: str | Path) -> Path:
    """Write records so that ``load_records(path, inline_images=True) == records`` (bytes images) and
    ``load_records(path) == records`` (path images).

    ``.jsonl``: image bytes are written verbatim to ``<stem>_images/<row>_<k>.<ext>`` next to the file
    and referenced by that relative path; path images are written as given and must resolve relative to
    ``path``. ``.parquet``: images become HF-style ``{"bytes", "path"}`` structs (bytes stay inline).
    Meta entries become top-level fields. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = list(records)
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [_row_dict(r, [{"bytes": i, "path": None} if isinstance(i, bytes) else
                              {"bytes": None, "path": i} for i in r.images]) for r in records]
        # from_pylist would take the columns of the first row only; build the union of all rows' keys.
        columns = list(dict.fromkeys(k for row in rows for k in row))
        pq.write_table(pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in columns}), path)
        return path
    if path.suffix.lower() != ".jsonl":
        raise ValueError(f"{path}: unsupported record file type (use .jsonl or .parquet)")
    image_dir = path.parent / f"{path.stem}_images"
    with path.open("w", encoding="utf-8") as f:
        for n, record in enumerate(records, start=1):
            refs: list[str] = []
            for k, image in enumerate(record.images):
                if isinstance(image, str):
                    refs.append(image)
                    continue
                image_dir.mkdir(exist_ok=True)
                name = f"{n:06d}_{k}.{_image_format(image) or 'png'}"
                (image_dir / name).write_bytes(image)
                refs.append(f"{image_dir.name}/{name}")
            try:
                f.write(json.dumps(_row_dict(record, refs), ensure_ascii=False) + "\n")
            except TypeError as e:
                raise ValueError(f"record {record.id!r}: meta is not JSON-serialisable: {e}") from e
    return path


def decode_image(ref: ImageRef, base_dir: str | Path = ".") -> torch.Tensor:
    """Decode an image reference to an RGB float tensor ``[3, H, W]`` in ``[0, 1]``.

    Args:
        ref: encoded bytes, or a path (relative to ``base_dir`` unless absolute).
        base_dir: the directory of the data file the reference came from.
    """
    source = io.BytesIO(ref) if isinstance(ref, bytes) else Path(base_dir) / ref
    with Image.open(source) as img:
        rgb = img.convert("RGB")
    w, h = rgb.size
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return pixels.permute(2, 0, 1).float().div_(255.0)  # [3, H, W]
