"""Record schema: validation that names file, row and field; JSONL and parquet round trips; decoding."""

from __future__ import annotations

import io
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diva_lightning.data.schema import (
    QuestionRecord,
    RecordError,
    decode_image,
    load_records,
    load_records_with_report,
    write_records,
)


def png_bytes(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """A PNG of the given rows of RGB pixels."""
    h, w = len(pixels), len(pixels[0])
    img = Image.new("RGB", (w, h))
    img.putdata([p for row in pixels for p in row])
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


RED, WHITE = (255, 0, 0), (255, 255, 255)
TINY = png_bytes([[RED, WHITE], [WHITE, RED]])


def sample_records() -> list[QuestionRecord]:
    return [
        QuestionRecord("q1", "How many red in <image>?", "2", [TINY], 3.5, ["Count red in <image>."],
                       ["Row 1: 1 red. Total 1.", "Row 2: 1 red. Total 2."], "integer",
                       {"source": "unit", "level": 2}),
        QuestionRecord("q2", "Compare <image> and <image>.", "B", [TINY, TINY], answer_type="choice"),
        QuestionRecord("q3", "What is 2+2?", "4", meta={"tags": ["arith"]}),
    ]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_round_trip_writes_png_files_and_reads_them_back(tmp_path: Path) -> None:
    records = sample_records()
    path = write_records(records, tmp_path / "d.jsonl")
    assert load_records(path, inline_images=True) == records
    # Without inlining the images are relative paths to files next to the data file.
    loaded = load_records(path)
    assert loaded[0].images == ["d_images/000001_0.png"]
    assert (tmp_path / "d_images" / "000001_0.png").read_bytes() == TINY
    assert loaded[0].meta == {"source": "unit", "level": 2}  # extra fields survive as meta
    assert torch.equal(decode_image(loaded[1].images[1], tmp_path), decode_image(TINY))
    # Writing records whose images are paths keeps them as paths: load(write(x)) == x exactly.
    assert load_records(write_records(loaded, tmp_path / "again.jsonl")) == loaded


def test_parquet_round_trip_with_bytes_and_path_images(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(TINY)
    records = sample_records() + [QuestionRecord("q4", "See <image>.", "1", ["img.png"], meta={"x": 1.5})]
    path = write_records(records, tmp_path / "d.parquet")
    # Heterogeneous meta (keys absent in some rows) must not come back as None-valued keys.
    assert load_records(path) == records


def test_parquet_written_by_hand_in_hf_style_is_read(tmp_path: Path) -> None:
    # The official data: a single image dict, "variant"/"step2" field names, integer answer.
    table = pa.Table.from_pylist([{"id": "a", "problem": "<image> How many?", "answer": 3,
                                   "images": {"bytes": TINY, "path": None}, "variant": ["<image> Count."],
                                   "step2": ["one", "two"], "difficulty": 7}])
    pq.write_table(table, tmp_path / "hf.parquet")
    (record,) = load_records(tmp_path / "hf.parquet")
    assert record == QuestionRecord("a", "<image> How many?", "3", [TINY], 7.0, ["<image> Count."],
                                    ["one", "two"])


BAD_ROWS = [
    # row 1: good
    json.dumps({"id": "ok1", "problem": "Count <image>.", "answer": "1", "images": ["img.png"]}),
    # row 2: JSON syntax error
    '{"id": "broken", "problem": ',
    # row 3: missing answer, difficulty out of range
    json.dumps({"id": "r3", "problem": "What?", "difficulty": 12}),
    # row 4: two <image> tags, one image; the image file is missing
    json.dumps({"id": "r4", "problem": "<image> vs <image>", "answer": "A", "images": ["nope.png"]}),
    # row 5: duplicate id of row 1
    json.dumps({"id": "ok1", "problem": "Again", "answer": "2"}),
    # row 6: wrong types
    json.dumps({"id": "r6", "problem": "Q", "answer": "2", "variants": "not a list", "difficulty": "hard",
                "answer_type": "number"}),
    # row 7: non-finite difficulty (Python's json reads NaN)
    '{"id": "r7", "problem": "Q", "answer": "2", "difficulty": NaN}',
    # row 8: good
    json.dumps({"id": "ok2", "problem": "Q", "answer": "5", "think_steps": ["a", "b"]}),
]
EXPECTED = [(2, "<row>"), (3, "answer"), (3, "difficulty"), (4, "images"), (4, "problem"), (5, "id"),
            (6, "variants"), (6, "difficulty"), (6, "answer_type"), (7, "difficulty")]


def test_all_problems_are_reported_at_once_with_file_row_and_field(tmp_path: Path) -> None:
    (tmp_path / "img.png").write_bytes(TINY)
    path = write_lines(tmp_path / "bad.jsonl", BAD_ROWS)
    with pytest.raises(RecordError) as info:
        load_records(path)
    message = str(info.value)
    for row, field in EXPECTED:
        where = rf"{re.escape(str(path))}:row {row}( \(id '[^']+'\))?"  # the id, when the row has one
        assert re.search(rf"{where}: field '{re.escape(field)}': \S", message), (row, field, message)
    assert len(info.value.problems) == len(EXPECTED)
    assert "duplicate id 'ok1' (first seen in row 1)" in message
    assert "has 2 '<image>' tag(s) but the row has 1 image(s)" in message


def test_skip_mode_returns_good_rows_counts_bad_ones_and_warns(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "img.png").write_bytes(TINY)
    path = write_lines(tmp_path / "bad.jsonl", BAD_ROWS)
    with caplog.at_level(logging.WARNING):
        records, report = load_records_with_report(path, on_error="skip")
    assert [r.id for r in records] == ["ok1", "ok2"]
    assert (report.rows, report.loaded, report.skipped) == (8, 2, 6)
    assert sorted((p.row, p.field) for p in report.problems) == sorted(EXPECTED)
    assert "loaded 2 of 8 rows (2 images checked); skipped 6 (" in caplog.text


def test_bad_inline_bytes_and_unknown_suffix_are_rejected(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([{"id": "x", "problem": "<image>", "answer": "1", "images": [b"GIF"]}])
    pq.write_table(table, tmp_path / "b.parquet")
    with pytest.raises(RecordError, match=r"row 1 \(id 'x'\): field 'images': item 0 <3 inline bytes>: not a PNG/JPEG"):
        load_records(tmp_path / "b.parquet")
    with pytest.raises(ValueError, match="unsupported record file type"):
        load_records(tmp_path / "data.csv")
    with pytest.raises(ValueError, match="on_error"):
        load_records(tmp_path / "b.parquet", on_error="ignore")  # type: ignore[arg-type]


def test_variant_paraphrases_must_place_the_same_images(tmp_path: Path) -> None:
    (tmp_path / "i.png").write_bytes(TINY)
    row = {"id": "v", "problem": "<image> How many?", "answer": "1", "images": ["i.png"],
           "variants": ["<image> Count.", "Count them."]}
    path = write_lines(tmp_path / "v.jsonl", [json.dumps(row)])
    with pytest.raises(RecordError, match=r"row 1 \(id 'v'\): field 'variants': item 1 has 0 '<image>' tag"):
        load_records(path)


def test_writer_refuses_meta_that_would_shadow_a_field(tmp_path: Path) -> None:
    record = QuestionRecord("m", "Q", "1", meta={"answer": "2"})
    with pytest.raises(ValueError, match="clash with record fields"):
        write_records([record], tmp_path / "m.jsonl")


def test_decode_image_gives_rgb_floats_in_unit_range(tmp_path: Path) -> None:
    image = decode_image(TINY)
    assert image.shape == (3, 2, 2) and image.dtype == torch.float32
    # Pixel (0, 0) is red: channels 1, 0, 0; pixel (0, 1) is white.
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert image[:, 0, 1].tolist() == [1.0, 1.0, 1.0]
    # A greyscale PNG on disk comes back as three equal channels (value 51 -> 0.2).
    Image.new("L", (3, 1), 51).save(tmp_path / "g.png")
    grey = decode_image("g.png", tmp_path)
    assert grey.shape == (3, 1, 3)
    assert torch.allclose(grey, torch.full((3, 1, 3), 0.2))
