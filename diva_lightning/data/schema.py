"""The question record (design.md section 8) and its JSONL / parquet reader and writer.

A data file holds one question per row with the fields of :class:`QuestionRecord`. Every row is
validated up front and *all* problems are reported together, each as
``file:row N (id 'x'): field 'y': what is wrong`` (rows are 1-based: the line number for JSONL, the row
index + 1 for parquet). Either the whole load fails with :class:`RecordError`
(``on_error="raise"``) or the bad rows are skipped, counted in a :class:`LoadReport` and logged as a
warning (``on_error="skip"``); nothing is dropped silently.

What is checked, before any model loads:

- structure: required fields present and typed, ids unique and non-blank, answers and problems not blank,
  one ``<image>`` tag per image in the problem and in every paraphrase, ``difficulty`` a finite number in
  [1, 9], ``answer_type`` one of :data:`ANSWER_TYPES`;
- metadata with a fixed meaning (:data:`META_TYPES`): ``level`` an integer, ``text_in_image`` and
  ``correct_think`` booleans, ``category`` and ``subject`` strings;
- size: every text field (and every string in the metadata) at most ``max_field_chars`` characters; a JSONL
  line longer than :data:`MAX_LINE_BYTES` is refused unread;
- content: every image fully decoded once (:mod:`diva_lightning.data.images`): missing, empty, truncated,
  corrupt or non-image files and inline bytes, and images over ``max_image_pixels``, are row problems
  naming the image. The decoded pixels go to an :class:`~diva_lightning.data.images.ImageStore` when one
  is given, so nothing decodes them again.

Encoding: JSONL is UTF-8; a byte-order mark at the start of the file (common in exported files) is read
and ignored; a line that is not valid UTF-8 is a problem of that row.

Compatibility with the authors' DIVA data (``../shared/reference/official-diva.md``): their parquet rows
load unchanged. ``variant`` (paraphrases) and ``step2`` (think steps) are read as ``variants`` /
``think_steps`` when the canonical name is absent, an image may be a HF-datasets style dict
``{"bytes": ..., "path": ...}`` (also as a single image rather than a list), ``difficulty`` may be an int.
Integer ids and numeric answers are converted to ``str``. Any other field (``category``, ``subject``,
``text_in_image``, ``step1``, ``answer1``, ``answer2``, ``correct_think``, ...) is kept in ``meta`` and
written back as a top-level field.
"""

from __future__ import annotations

import codecs
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diva_lightning.core.choices import ReadMode, check_choice
from diva_lightning.core.difficulty import DEFAULT_DIFFICULTY
from diva_lightning.data.images import (
    MAX_IMAGE_PIXELS,
    DecodeJob,
    ImageRef,
    ImageStore,
    decode_all,
    decode_ref,
    describe,
    to_float,
)

logger = logging.getLogger(__name__)

IMAGE_TAG = "<image>"
ANSWER_TYPES = ("choice", "integer", "float", "expression", "text")
D_MIN, D_MAX = 1.0, 9.0
MAX_FIELD_CHARS = 100_000
"""Default bound on the characters of one text field. The authors' prompt budget is 2,048 tokens (about
8,000 characters): 100,000 leaves room for long think steps and metadata, and refuses a 50 MB line."""
MAX_LINE_BYTES = 64 * 1024 * 1024
"""A JSONL line longer than this is not even parsed (its row is a problem)."""
# Canonical field -> official DIVA field name accepted as an alias when reading.
_ALIASES = {"variants": "variant", "think_steps": "step2"}
_FIELDS = ("id", "problem", "answer", "images", "difficulty", "variants", "think_steps", "answer_type")
META_TYPES: dict[str, tuple[type, str]] = {
    "level": (int, "an integer"),  # per-level validation metrics (the data module reads int(level))
    "text_in_image": (bool, "a boolean"),  # authors' OCR flag: image variants are rotation only
    "correct_think": (bool, "a boolean"),
    "category": (str, "a string"),
    "subject": (str, "a string"),
}
"""Metadata fields with a fixed meaning, validated when present."""
_MAGIC = {b"\x89PNG\r\n\x1a\n": "png", b"\xff\xd8\xff": "jpg", b"GIF8": "gif", b"BM": "bmp"}

Bad = list[tuple[str, str]]


@dataclass
class QuestionRecord:
    """One question. ``images`` are paths relative to the data file (or absolute) or encoded bytes;
    ``problem`` holds one ``<image>`` tag per image.

    ``data_file`` is the resolved path of the file the record was read from (None for records built in
    code). Relative image paths resolve against its folder, and it keys the record's decoded images. ``row``
    is its 1-based row there, for problems found after loading (a prompt too long for the policy). Neither is a
    row field (never written) nor takes part in equality.
    """

    id: str
    problem: str
    answer: str
    images: list[ImageRef] = field(default_factory=list)
    difficulty: float = DEFAULT_DIFFICULTY
    variants: list[str] = field(default_factory=list)
    think_steps: list[str] = field(default_factory=list)
    answer_type: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    data_file: str | None = field(default=None, compare=False, repr=False)
    row: int | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class RowProblem:
    """One validation problem: ``row`` is 1-based (0 = the whole file), ``field`` is ``'<row>'`` for
    row-level problems; ``record_id`` is the row's id when it could be read."""

    file: str
    row: int
    field: str
    message: str
    record_id: str | None = None

    def __str__(self) -> str:
        rid = f" (id {_short(self.record_id)})" if self.record_id is not None else ""
        return f"{self.file}:row {self.row}{rid}: field '{self.field}': {self.message}"


@dataclass
class LoadReport:
    """What a load did: rows seen, records returned, and every problem found (skip mode)."""

    path: str
    rows: int = 0
    loaded: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    images: int = 0
    """Images decoded and checked."""

    @property
    def skipped(self) -> int:
        """Number of rows dropped (a row with several problems counts once)."""
        return self.rows - self.loaded

    def skipped_by_field(self) -> dict[str, int]:
        """Skipped rows per field with a problem (a row with problems in two fields counts in both)."""
        per_row = {(p.row, p.field) for p in self.problems}
        return dict(sorted(Counter(f for _, f in per_row).items()))

    def summary(self, verb: str = "skipped") -> str:
        """One line: ``file: loaded 8 of 10 rows (12 images checked); skipped 2 (images: 1, answer: 1)``; ``verb``
        says what happened to the bad rows ("rejected" when they stop the run)."""
        line = f"{self.path}: loaded {self.loaded} of {self.rows} rows ({self.images} images checked)"
        if self.skipped:
            reasons = ", ".join(f"{f}: {n}" for f, n in self.skipped_by_field().items())
            line += f"; {verb} {self.skipped} ({reasons})"
        return line


class RecordError(ValueError):
    """Raised with every problem of a data file (or of several files), one per line."""

    def __init__(self, problems: list[RowProblem]) -> None:
        self.problems = problems
        lines = "\n".join(str(p) for p in problems)
        files = sorted({p.file for p in problems})
        where = "record file" if len(files) == 1 else f"{len(files)} record files"
        super().__init__(f"{len(problems)} problem(s) in {where}:\n{lines}")


def _image_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC.items() if data.startswith(magic)), None)


def _type_name(value: object) -> str:
    return type(value).__name__


def _short(value: object, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: messages never echo a 50 MB value."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} chars)"


def _check_length(name: str, value: str, limit: int, bad: Bad) -> None:
    if len(value) > limit:
        bad.append((name, f"{len(value):,} characters is over the limit of {limit:,} (max_field_chars)"))


def _str_list(value: object, name: str, limit: int, bad: Bad) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        bad.append((name, f"expected a list of strings, got {_type_name(value)}"))
        return []
    for k, item in enumerate(value):
        if not item.strip():
            bad.append((name, f"item {k} is blank"))
        _check_length(f"{name}", item, limit, bad)
    return list(value)


def _image_refs(value: object, bad: Bad) -> list[ImageRef]:
    """The row's image references, structurally checked (content is checked by the loader)."""
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
            out.append(bytes(item))
        elif isinstance(item, str) and item.strip():
            out.append(item)
        else:
            what = "a blank path" if isinstance(item, str) else _type_name(item)
            bad.append(("images", f"item {k}: expected a path or bytes, got {what}"))
    return out


def _check_meta(meta: dict[str, Any], limit: int, bad: Bad) -> dict[str, Any]:
    for name, (kind, what) in META_TYPES.items():
        if name not in meta or meta[name] is None:
            continue
        value = meta[name]
        if kind is int and isinstance(value, float) and value.is_integer():
            meta[name] = value = int(value)  # 3.0 from a JSON writer is the integer 3
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            bad.append((name, f"expected {what}, got {_type_name(value)} {_short(value)}"))
    for name, value in meta.items():
        items = value if isinstance(value, list | tuple) else [value]
        longest = max((len(v) for v in items if isinstance(v, str)), default=0)
        if longest > limit:
            bad.append((name, f"{longest:,} characters is over the limit of {limit:,} (max_field_chars)"))
    return meta


def _parse_row(row: dict[str, Any], *, max_field_chars: int
               ) -> tuple[QuestionRecord | None, list[ImageRef], Bad]:
    """Structural checks of one row: the record (None when invalid), its image refs and the problems."""
    bad: Bad = []
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
            if not math.isfinite(value):
                bad.append((name, f"{value} is not a finite number"))
                return None
            value = str(value)
        if not isinstance(value, str):
            bad.append((name, f"expected a string, got {_type_name(value)}"))
            return None
        if not value.strip():
            bad.append((name, "is blank"))
            return None
        _check_length(name, value, max_field_chars, bad)
        return value

    rid = text("id", allow_numbers=True)
    problem = text("problem", allow_numbers=False)
    answer = text("answer", allow_numbers=True)
    images = _image_refs(row.get("images"), bad)
    variants = _str_list(row.get("variants"), "variants", max_field_chars, bad)
    think_steps = _str_list(row.get("think_steps"), "think_steps", max_field_chars, bad)

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
        difficulty = DEFAULT_DIFFICULTY
    elif isinstance(difficulty, bool) or not isinstance(difficulty, int | float):
        bad.append(("difficulty", f"expected a number, got {_type_name(difficulty)} {_short(difficulty)}"))
    elif not math.isfinite(difficulty) or not D_MIN <= difficulty <= D_MAX:
        bad.append(("difficulty", f"{difficulty} is not a finite number in [{D_MIN:g}, {D_MAX:g}]"))

    answer_type = row.get("answer_type")
    if answer_type is not None and answer_type not in ANSWER_TYPES:
        bad.append(("answer_type", f"{_short(answer_type)} is not one of {', '.join(ANSWER_TYPES)}"))

    meta = _check_meta({k: v for k, v in row.items() if k not in _FIELDS}, max_field_chars, bad)
    if bad or rid is None or problem is None or answer is None:
        return None, images, bad
    return QuestionRecord(rid, problem, answer, images, float(difficulty), variants, think_steps,
                          answer_type, meta), images, bad


def record_from_row(row: dict[str, Any], base_dir: Path | None = None, *, inline_images: bool = False,
                    max_field_chars: int = MAX_FIELD_CHARS) -> tuple[QuestionRecord | None, Bad]:
    """Validate one row's structure. Returns the record (None when invalid) and a list of (field, problem).

    Image *content* is not checked here (it is by :func:`load_records_with_report`, in bulk); with
    ``inline_images`` path images are read into bytes relative to ``base_dir``, and a missing file is a
    problem.
    """
    record, refs, bad = _parse_row(row, max_field_chars=max_field_chars)
    if record is None or not inline_images:
        return record, bad
    inlined: list[ImageRef] = []
    for k, ref in enumerate(refs):
        try:
            inlined.append(ref if isinstance(ref, bytes) else (Path(base_dir or ".") / ref).read_bytes())
        except OSError as e:
            bad.append(("images", f"item {k} {describe(ref)}: cannot read: {e.strerror or e}"))
    if bad:
        return None, bad
    record.images = inlined
    return record, bad


Row = tuple[int, dict[str, Any] | None, str | None]


# Byte-order marks of the encodings a text file is read in besides UTF-8 (UTF-32 first: its LE mark starts
# with UTF-16's).
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, "utf-8-sig"))


def bom_encoding(head: bytes) -> str | None:
    """The encoding a file's byte-order mark names ("utf-16", "utf-32", "utf-8-sig"), or None."""
    return next((name for bom, name in _BOMS if head.startswith(bom)), None)


def decode_text(data: bytes, path: Path) -> str:
    """A whole text file's content: UTF-8, or the UTF-16/32 (or UTF-8 with BOM) its byte-order mark names, read
    as such (logged); a UTF-16 file without a mark is an error that says so (a bare decode error otherwise)."""
    encoding = bom_encoding(data[:4])
    if encoding in ("utf-16", "utf-32"):
        logger.info("%s: read as %s (byte-order mark)", path, encoding.upper())
    try:
        return data.decode(encoding or "utf-8")
    except UnicodeDecodeError as e:
        if b"\x00" in data[:200]:
            raise ValueError(f"{path}: looks UTF-16 encoded without a byte-order mark (NUL bytes); save it as "
                             "UTF-8") from None
        raise ValueError(f"{path}: not valid {(encoding or 'utf-8').upper()} (byte {e.start}: "
                         f"{data[e.start:e.start + 4]!r})") from None


def _lines(path: Path) -> Iterator[bytes | None]:
    """The file's lines as UTF-8 bytes (None: a line over MAX_LINE_BYTES, left unread): read line by line for
    UTF-8, decoded whole for UTF-16/32."""
    with path.open("rb") as f:
        encoding = bom_encoding(f.read(4))
        f.seek(0)
        if encoding in ("utf-16", "utf-32"):
            for line in decode_text(f.read(), path).split("\n"):  # (JSON strings may hold U+2028)
                data = line.encode("utf-8")
                yield data if len(data) <= MAX_LINE_BYTES else None
            return
        while raw := f.readline(MAX_LINE_BYTES + 1):
            if len(raw) > MAX_LINE_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line unread
                    raw = f.readline(1 << 20)
                yield None
                continue
            yield raw


def jsonl_rows(path: Path) -> Iterator[Row]:
    """Yield (1-based line number, parsed object or None, problem or None); skips blank lines.

    Read as bytes so that a UTF-8 BOM, an invalid byte or an over-long line is a problem of one row. A file with
    a UTF-16/32 byte-order mark is read in that encoding; UTF-16 without a mark is named as such (once, not as
    one "invalid JSON" per line).
    """
    n = 0
    for raw in _lines(path):
        n += 1
        if raw is None:
            yield n, None, f"line is longer than {MAX_LINE_BYTES:,} bytes: not parsed"
            continue
        if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if n == 1 and b"\x00" in raw:
            yield n, None, "the file looks UTF-16 encoded without a byte-order mark (NUL bytes): save it as UTF-8"
            return
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, None, f"not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r})"
            continue
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


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise RecordError([RowProblem(str(path), 0, "<file>", f"not a readable parquet file: {e}")]) from None
    for n, row in enumerate(table.to_pylist(), start=1):
        # Parquet is columnar: a field absent from a row reads back as null, so nulls in extra
        # columns mean "absent" (known fields treat null as their default).
        yield n, {k: v for k, v in row.items() if v is not None or k in _FIELDS}, None


def _row_id(obj: dict[str, Any] | None) -> str | None:
    rid = obj.get("id") if obj is not None else None
    return str(rid) if isinstance(rid, str | int) and not isinstance(rid, bool) else None


def load_records_with_report(
    path: str | Path,
    *,
    on_error: ReadMode = "raise",
    inline_images: bool = False,
    images: ImageStore | None = None,
    max_image_pixels: int | None = None,
    max_field_chars: int = MAX_FIELD_CHARS,
    decode_workers: int | None = None,
) -> tuple[list[QuestionRecord], LoadReport]:
    """Read and validate a ``.jsonl`` or ``.parquet`` record file (see the module docstring for the checks).

    Args:
        path: the data file; relative image paths are resolved against its directory.
        on_error: ``"raise"``: any problem raises :class:`RecordError` listing all of them.
            ``"skip"``: bad rows are dropped, counted in the report and logged as one warning.
            ``"collect"``: as skip, without the warning (the caller reports the problems).
        inline_images: replace path images by their bytes (records no longer depend on the directory).
        images: keep the decoded pixels of the loaded records here (keyed by data file and id).
        max_image_pixels: bound on width x height per image (default: the store's, else
            :data:`~diva_lightning.data.images.MAX_IMAGE_PIXELS`).
        max_field_chars: bound on the characters of one text field.
        decode_workers: threads decoding images (default: up to 8, one per core).

    Returns:
        The valid records in file order (each with ``data_file`` set) and a :class:`LoadReport`.
    """
    check_choice("on_error", on_error, ReadMode)
    if max_field_chars < 1:
        raise ValueError(f"max_field_chars must be >= 1, got {max_field_chars}")
    if max_image_pixels is None:
        max_image_pixels = images.max_pixels if images is not None else MAX_IMAGE_PIXELS
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterable[Row] = jsonl_rows(path)
    elif suffix == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise ValueError(f"{path}: unsupported record file type {suffix!r} (use .jsonl or .parquet)")
    data_file = os.path.abspath(path)
    base_dir = Path(data_file).parent

    # Pass 1: structure of every row.
    report = LoadReport(path=str(path))
    parsed: list[tuple[int, str | None, QuestionRecord | None, list[ImageRef], Bad]] = []
    first_row_of: dict[str, int] = {}
    for n, obj, syntax in rows:
        report.rows += 1
        if obj is None:
            parsed.append((n, None, None, [], [("<row>", syntax or "unreadable row")]))
            continue
        record, refs, bad = _parse_row(obj, max_field_chars=max_field_chars)
        rid = record.id if record is not None else _row_id(obj)
        if rid is not None and rid in first_row_of:
            bad.append(("id", f"duplicate id {_short(rid)} (first seen in row {first_row_of[rid]})"))
        elif rid is not None:
            first_row_of[rid] = n
        parsed.append((n, rid, record if not bad else None, refs, bad))

    # Pass 2: the content of every image (of bad rows too: all problems are reported at once).
    jobs = [DecodeJob(ref, base_dir, keep=images is not None and record is not None,
                      inline=inline_images and isinstance(ref, str))
            for _, _, record, refs, _ in parsed for ref in refs]
    results = decode_all(jobs, max_pixels=max_image_pixels, workers=decode_workers)
    records: list[QuestionRecord] = []
    for n, rid, record, refs, bad in parsed:
        pixels = []
        for k, ref in enumerate(refs):
            result = next(results)
            report.images += 1
            if result.error is not None:
                bad.append(("images", f"item {k} {describe(ref)}: {result.error}"))
            elif record is not None:
                pixels.append(result.pixels)
                if result.data is not None:
                    record.images[k] = result.data
        report.problems.extend(RowProblem(str(path), n, f, m, rid) for f, m in bad)
        if record is not None and not bad:
            record.data_file, record.row = data_file, n
            if images is not None:
                images.put(record, [p for p in pixels if p is not None])
            records.append(record)
    report.loaded = len(records)

    if report.problems and on_error == "raise":
        raise RecordError(report.problems)
    if report.skipped and on_error == "skip":
        logger.warning("%s; first problem: %s", report.summary(), report.problems[0])
    return records, report


def load_records(path: str | Path, *, on_error: ReadMode = "raise", inline_images: bool = False,
                 **limits: Any) -> list[QuestionRecord]:
    """:func:`load_records_with_report` without the report (skips are still logged as a warning)."""
    return load_records_with_report(path, on_error=on_error, inline_images=inline_images, **limits)[0]


def _relocate(ref: ImageRef, record: QuestionRecord, target_dir: Path) -> Any:
    """A path image of ``record`` as seen from ``target_dir`` (so a written file's paths still resolve)."""
    if isinstance(ref, bytes) or record.data_file is None or Path(ref).is_absolute():
        return ref
    resolved = Path(record.data_file).parent / ref
    return os.path.relpath(resolved, os.path.abspath(target_dir))


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
    and referenced by that relative path; path images of records read from a file are rewritten relative
    to ``path``'s folder (so they still resolve); others are written as given and must resolve relative to
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
                              {"bytes": None, "path": _relocate(i, r, path.parent)} for i in r.images])
                for r in records]
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
                    refs.append(_relocate(image, record, path.parent))
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


def decode_image(ref: ImageRef, base_dir: str | Path | None = ".", *, max_pixels: int = MAX_IMAGE_PIXELS
                 ) -> torch.Tensor:
    """Decode an image reference to an RGB float tensor ``[3, H, W]`` in ``[0, 1]``.

    Args:
        ref: encoded bytes, or a path (relative to ``base_dir`` unless absolute).
        base_dir: the directory of the data file the reference came from (None: the current directory).
        max_pixels: refuse images with more pixels than this (:class:`~diva_lightning.data.images.ImageError`).
    """
    return to_float(decode_ref(ref, base_dir, max_pixels=max_pixels))
