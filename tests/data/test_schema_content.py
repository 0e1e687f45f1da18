"""Fault corpus for the loader (issue 16 items 1 and 8): every bad input ends in a named problem before training.

Each case is generated here (no committed binaries) and asserts the exact outcome: the file, row, field and id
of the problem and its reason in raise mode, and the same rows skipped and counted in skip mode.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diva_lightning.data import schema
from diva_lightning.data.images import ImageError, ImageStore, decode_bytes, decode_ref
from diva_lightning.data.schema import RecordError, load_records, load_records_with_report
from tests.data.corpus import garbage, image_bytes, png_header_only, truncated

GOOD = image_bytes("PNG", seed=0)


def _row(rid: str, image: str | None = "ok.png", **fields: object) -> str:
    row: dict[str, object] = {"id": rid, "problem": "How many in <image>?" if image else "What is 2+2?",
                              "answer": "3", "images": [image] if image else []}
    row.update(fields)
    return json.dumps(row)


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[tuple[int, str, str, str]]]:
    """A JSONL file holding one case of every bad input, and the exact (row, id, field, reason) expected."""
    img = tmp_path / "img"
    img.mkdir()
    (img / "ok.png").write_bytes(GOOD)
    (img / "ok.jpg").write_bytes(image_bytes("JPEG", seed=2))
    (img / "empty.png").write_bytes(b"")
    (img / "garbage.png").write_bytes(garbage())
    (img / "truncated.png").write_bytes(truncated(image_bytes("PNG", seed=3)))
    (img / "truncated.jpg").write_bytes(truncated(image_bytes("JPEG", seed=4)))
    (img / "bomb.png").write_bytes(png_header_only(20000, 20000))
    lines = [
        _row("good1", "img/ok.png"),                                   # 1
        _row("zero", "img/empty.png"),                                 # 2
        _row("junk", "img/garbage.png"),                               # 3
        _row("cut-png", "img/truncated.png"),                          # 4
        _row("cut-jpg", "img/truncated.jpg"),                          # 5
        _row("bomb", "img/bomb.png"),                                  # 6
        _row("gone", "img/missing.png"),                               # 7
        _row("blank", "img/ok.jpg", answer="   "),                     # 8
        _row("emptyans", None, answer=""),                             # 9
        _row("lvl", None, level="Level 3"),                            # 10
        _row("ocr", None, text_in_image="yes", subject=7),             # 11
        _row("long", None, problem="x" * 200),                         # 12 (limit 100 in this test)
        _row("good2", "img/ok.jpg", level=3, text_in_image=True),      # 13
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected = [
        (2, "zero", "images", "item 0 'img/empty.png': empty image (0 bytes)"),
        (3, "junk", "images", "item 0 'img/garbage.png': not a PNG/JPEG/GIF/BMP/WEBP image"),
        (4, "cut-png", "images", "item 0 'img/truncated.png': cannot decode image: OSError: image file is truncated"),
        (5, "cut-jpg", "images", "item 0 'img/truncated.jpg': cannot decode image: OSError: Truncated File Read"),
        (6, "bomb", "images", "item 0 'img/bomb.png': 400,000,000 pixels is over the limit of 16,777,216"),
        (7, "gone", "images", f"item 0 'img/missing.png': image file not found: {img / 'missing.png'}"),
        (8, "blank", "answer", "is blank"),
        (9, "emptyans", "answer", "is blank"),
        (10, "lvl", "level", "expected an integer, got str 'Level 3'"),
        (11, "ocr", "text_in_image", "expected a boolean, got str 'yes'"),
        (11, "ocr", "subject", "expected a string, got int 7"),
        (12, "long", "problem", "200 characters is over the limit of 100 (max_field_chars)"),
    ]
    return path, expected


def test_every_bad_input_is_named_by_file_row_id_and_field(corpus: tuple[Path, list]) -> None:
    path, expected = corpus
    with pytest.raises(RecordError) as info:
        load_records(path, max_field_chars=100)
    got = [(p.row, p.record_id, p.field) for p in info.value.problems]
    assert got == [(row, rid, field) for row, rid, field, _ in expected]
    for problem, (_, _, _, reason) in zip(info.value.problems, expected):
        assert problem.message.startswith(reason), (problem.message, reason)
    # the printed line names all four, e.g. ".../bad.jsonl:row 2 (id 'zero'): field 'images': item 0 ..."
    assert f"{path}:row 6 (id 'bomb'): field 'images': item 0 'img/bomb.png': 400,000,000 pixels" in str(info.value)
    assert str(info.value).startswith("12 problem(s) in record file:")


def test_skip_mode_keeps_the_good_rows_and_counts_every_reason(corpus: tuple[Path, list],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    path, _ = corpus
    store = ImageStore()
    with caplog.at_level(logging.WARNING):
        records, report = load_records_with_report(path, on_error="skip", images=store, max_field_chars=100)
    assert [r.id for r in records] == ["good1", "good2"]
    assert records[1].meta == {"level": 3, "text_in_image": True}
    assert (report.rows, report.loaded, report.skipped, report.images) == (13, 2, 11, 9)
    assert report.skipped_by_field() == {"answer": 2, "images": 6, "level": 1, "problem": 1, "subject": 1,
                                         "text_in_image": 1}
    assert (f"{path}: loaded 2 of 13 rows (9 images checked); skipped 11 (answer: 2, images: 6, level: 1, "
            "problem: 1, subject: 1, text_in_image: 1)") in caplog.text
    # the kept rows' pixels are in the store, decoded once; nothing of the skipped rows is kept
    assert len(store) == 2 and all(r in store for r in records)
    assert torch.equal(store.get(records[0])[0], decode_ref(GOOD).float() / 255)


def test_a_bom_is_read_and_invalid_utf8_or_json_is_a_row_problem(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    body = _row("b1", None) + "\n" + _row("b2", None) + "\n"
    path.write_bytes(codecs.BOM_UTF8 + body.encode("utf-8"))
    assert [r.id for r in load_records(path)] == ["b1", "b2"]
    path.write_bytes(body.encode("utf-8") + b'{"id": "b3", "problem": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(RecordError, match=r"row 3: field '<row>': not valid UTF-8 \(byte 28: b'\\xe9"):
        load_records(path)


def test_a_50_mb_problem_is_refused_by_the_default_field_limit(tmp_path: Path) -> None:
    path = tmp_path / "huge.jsonl"
    path.write_text(_row("h", None, problem="x" * 50_000_000) + "\n" + _row("ok", None) + "\n", encoding="utf-8")
    records, report = load_records_with_report(path, on_error="skip")
    assert [r.id for r in records] == ["ok"]
    (problem,) = report.problems
    assert str(problem) == (f"{path}:row 1 (id 'h'): field 'problem': 50,000,000 characters is over the limit of "
                            "100,000 (max_field_chars)")


def test_a_line_over_the_line_limit_is_not_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "MAX_LINE_BYTES", 1000)  # the real limit is 64 MiB; the reader logic is the same
    path = tmp_path / "long.jsonl"
    path.write_text("\n".join([_row("a", None), _row("b", None, problem="y" * 5000), _row("c", None)]) + "\n",
                    encoding="utf-8")
    records, report = load_records_with_report(path, on_error="skip")
    assert [r.id for r in records] == ["a", "c"]  # the reader resynchronises on the next line
    assert [str(p).split(": ", 1)[1] for p in report.problems] == [
        "field '<row>': line is longer than 1,000 bytes: not parsed"]


def test_inline_parquet_images_are_decoded_with_the_same_checks(tmp_path: Path) -> None:
    rows = [{"id": "p1", "problem": "<image>", "answer": "1", "images": {"bytes": GOOD, "path": None}},
            {"id": "p2", "problem": "<image>", "answer": "1", "images": {"bytes": truncated(GOOD), "path": None}},
            {"id": "p3", "problem": "<image>", "answer": "1", "images": {"bytes": None, "path": "nope.png"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    with pytest.raises(RecordError) as info:
        load_records(tmp_path / "d.parquet")
    assert [(p.row, p.record_id) for p in info.value.problems] == [(2, "p2"), (3, "p3")]
    assert re.search(r"item 0 <[\d,]+ inline bytes>: cannot decode image: OSError: image file is truncated",
                     str(info.value))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RecordError, match=r"broken.parquet:row 0: field '<file>': not a readable parquet file"):
        load_records(tmp_path / "broken.parquet")


def test_the_pixel_bound_is_configurable_and_checked_from_the_header(tmp_path: Path) -> None:
    image = image_bytes("PNG", size=(40, 30))
    assert decode_bytes(image, max_pixels=1200).shape == (3, 30, 40)
    with pytest.raises(ImageError, match=r"^40x30 = 1,200 pixels is over the limit of 1,199 \(max_image_pixels\)$"):
        decode_bytes(image, max_pixels=1199)
    (tmp_path / "i.png").write_bytes(image)
    (tmp_path / "d.jsonl").write_text(_row("a", "i.png") + "\n", encoding="utf-8")
    with pytest.raises(RecordError, match="1,200 pixels is over the limit of 1,000"):
        load_records_with_report(tmp_path / "d.jsonl", images=ImageStore(max_pixels=1000))
    assert len(load_records(tmp_path / "d.jsonl", max_image_pixels=1200)) == 1
