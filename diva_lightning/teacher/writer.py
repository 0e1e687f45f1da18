"""Append-per-batch JSONL output that a killed run can resume.

Rows are written in the record format ``data.schema.load_records`` reads (the same fields as
``write_records``; meta entries, the provenance included, as top-level fields; images as files in
``<stem>_images/<row>_<k>.<ext>`` next to the output, named by the row's line number). ``write_records``
rewrites its whole file, which a long run cannot afford after every batch, hence this writer.

Crash safety: a batch's images are written first, then all its lines in one write, then flushed and
fsync'ed. On opening an existing file, a torn last line and the rows of a batch that was not completely
written (each row's provenance says which batch it is in and how many rows that batch has) are cut off,
so a SIGKILL at any moment loses at most the batch in flight and a resumed run redoes exactly it.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from diva_lightning.data.schema import QuestionRecord

PROVENANCE_KEY = "augment"
_FIELDS = ("id", "problem", "answer", "images", "difficulty", "variants", "think_steps", "answer_type")
_RESERVED = (*_FIELDS, "variant", "step2")  # the official aliases would be read as our fields


def _image_ext(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as img:
        return (img.format or "png").lower().replace("jpeg", "jpg")


class AugmentWriter:
    """Appends augmented rows to ``path`` (``.jsonl``), batch by batch; remembers what is already there.

    Attributes:
        path: the output file.
        provenance: ``id -> provenance dict`` of every complete row in the file, in file order.
        dropped: how many rows of an incomplete last batch (or a torn line) were cut off when opening.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".jsonl":
            raise ValueError(f"{self.path}: the augment output must be a .jsonl file (it is appended per batch); "
                             "convert it afterwards with data.schema.write_records if you need parquet")
        self.image_dir = self.path.parent / f"{self.path.stem}_images"
        self.provenance: dict[str, dict[str, Any]] = {}
        self.dropped = 0
        self._rows = 0
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        data = self.path.read_bytes()
        lines: list[tuple[int, dict[str, Any]]] = []  # (end offset, row)
        offset = 0
        for n, raw in enumerate(data.splitlines(keepends=True), start=1):
            end = offset + len(raw)
            try:
                row = json.loads(raw) if raw.endswith(b"\n") else None
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get(PROVENANCE_KEY), dict):
                if end < len(data):  # only the last line may be torn; anything else is not our file
                    raise ValueError(f"{self.path}: line {n} is not an augment output row; "
                                     "use a new --output (this one was not written by augment)")
                self.dropped += 1
                break
            lines.append((end, row))
            offset = end
        # cut an incomplete trailing batch: its rows share a batch key and say how many they should be
        if lines:
            last = lines[-1][1][PROVENANCE_KEY]
            tail = 0
            for _, row in reversed(lines):
                if row[PROVENANCE_KEY].get("batch_seed") != last.get("batch_seed"):
                    break
                tail += 1
            if tail < int(last.get("batch_rows", tail)):
                del lines[-tail:]
                self.dropped += tail
        keep = lines[-1][0] if lines else 0
        if keep < len(data):
            with self.path.open("r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
        self._rows = len(lines)
        self.provenance = {row["id"]: row[PROVENANCE_KEY] for _, row in lines}

    def append(self, records: Sequence[QuestionRecord], provenance: Sequence[dict[str, Any]],
               source_dir: str | Path) -> None:
        """Append one batch; ``provenance[i]`` is stored under ``augment`` in row ``i``.

        ``source_dir``: the input file's directory, which path images are relative to (their bytes are
        copied next to the output, so the output does not depend on the input's location).
        """
        lines = []
        for record, prov in zip(records, provenance, strict=True):
            self._rows += 1
            clash = sorted(set(record.meta) & set(_RESERVED))
            if clash:
                raise ValueError(f"record {record.id!r}: meta keys {clash} clash with record fields")
            refs = [self._write_image(image, self._rows, k, Path(source_dir)) for k, image in enumerate(record.images)]
            row: dict[str, Any] = {"id": record.id, "problem": record.problem, "answer": record.answer,
                                   "images": refs, "difficulty": record.difficulty, "variants": record.variants,
                                   "think_steps": record.think_steps, "answer_type": record.answer_type}
            row.update(record.meta)
            row[PROVENANCE_KEY] = prov
            try:
                lines.append(json.dumps(row, ensure_ascii=False) + "\n")
            except TypeError as e:
                raise ValueError(f"record {record.id!r}: meta is not JSON-serialisable: {e}") from e
            self.provenance[record.id] = prov
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
            os.fsync(f.fileno())

    def _write_image(self, image: str | bytes, row: int, k: int, source_dir: Path) -> str:
        data = image if isinstance(image, bytes) else (source_dir / image).read_bytes()
        self.image_dir.mkdir(parents=True, exist_ok=True)
        name = f"{row:06d}_{k}.{_image_ext(data)}"
        (self.image_dir / name).write_bytes(data)
        return f"{self.image_dir.name}/{name}"
