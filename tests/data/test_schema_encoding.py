"""Text encodings and what a load says it did (issue 22): a UTF-16 file was 16 "invalid JSON" lines, and a
rejected row under on_error: raise was first logged as "skipped ... (on_error=skip)"."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from diva_lightning.data.schema import RecordError, load_records_with_report
from diva_lightning.system.datamodule import DivaDataModule

ROWS = [{"id": "q1", "problem": "What is 1 + 2?", "answer": "3"},
        {"id": "q2", "problem": "What is 2 + 2?", "answer": "4"}]


def _text(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32", "utf-8-sig"])
def test_a_file_with_a_byte_order_mark_is_read_in_its_encoding(tmp_path: Path, encoding: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.jsonl"
    data = _text(ROWS).encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data  # Python's utf-16-be writes no mark
    path.write_bytes(data)
    with caplog.at_level(logging.INFO, logger="diva_lightning"):
        records, report = load_records_with_report(path)
    assert [r.answer for r in records] == ["3", "4"] and report.rows == 2
    if encoding != "utf-8-sig":
        assert f"{path}: read as {encoding[:6].upper()} (byte-order mark)" in caplog.text


def test_utf16_without_a_mark_is_named_once(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_bytes(_text(ROWS * 8).encode("utf-16-le"))
    with pytest.raises(RecordError) as info:
        load_records_with_report(path)
    assert str(info.value) == (f"1 problem(s) in record file:\n{path}:row 1: field '<row>': the file looks UTF-16 "
                               "encoded without a byte-order mark (NUL bytes): save it as UTF-8")


def test_rejected_rows_are_not_logged_as_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(_text([*ROWS, {"id": "q3", "problem": "?", "answer": ""}]))
    with caplog.at_level(logging.INFO, logger="diva_lightning"), pytest.raises(RecordError, match="field 'answer'"):
        DivaDataModule(train_source=str(path), val_source=None, test_source=None).setup("fit")
    assert "skip" not in caplog.text and "WARNING" not in [r.levelname for r in caplog.records]
    assert f"{path}: loaded 2 of 3 rows (0 images checked); rejected 1 (answer: 1) (on_error=raise: the run stops)" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diva_lightning"):
        DivaDataModule(train_source=str(path), val_source=None, test_source=None, on_error="skip",
                       questions_per_step=2).setup("fit")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipped 1 (answer: 1) (on_error=skip); first problem: " in warnings[0]
