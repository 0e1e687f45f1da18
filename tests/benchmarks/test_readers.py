"""Readers on fixture files in each benchmark's native format: ids, prompts, images, meta, bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from diva_lightning.data.schema import IMAGE_TAG, RecordError, decode_image, load_records, write_records
from diva_lightning.evaluation import BENCHMARKS, describe_load, get_benchmark

from .conftest import (
    mathvista_rows,
    olympiad_rows,
    png_bytes,
    wemath_composite,
    wemath_row,
    write_jsonl,
    write_parquet,
    write_png,
    write_wemath,
)


def read(name: str, path: Path, on_error: str = "raise"):  # type: ignore[no-untyped-def]
    return get_benchmark(name).read(path, on_error=on_error)  # type: ignore[arg-type]


def test_registry_has_the_six_benchmarks_in_table_order() -> None:
    assert list(BENCHMARKS) == ["mathvista", "mathverse", "mathvision", "olympiadbench", "wemath", "mmk12"]
    assert get_benchmark("MathVista").name == "mathvista"
    with pytest.raises(ValueError, match="unknown benchmark 'mathqa'; known: mathvista"):
        get_benchmark("mathqa")


def test_every_reader_keeps_ids_tags_and_images_consistent(bench_files: dict[str, Path]) -> None:
    expected_ids = {
        "mathvista": ["1", "2", "3", "4", "5", "6"],
        "mathverse": ["1", "2", "3", "4", "5", "6", "7"],
        "mathvision": ["1", "2", "3", "4", "5", "6"],
        "olympiadbench": ["1", "2", "3", "4", "5", "6", "7"],
        "wemath": ["2steps_1|2steps_1", "2steps_1|2steps_2", "2steps_1|2steps_multi", "3steps_1|3steps_1",
                   "3steps_1|3steps_2", "3steps_1|3steps_3", "3steps_1|3steps_multi"],
        "mmk12": ["1", "2", "3", "4"],
    }
    for name, path in bench_files.items():
        records, report = read(name, path)
        assert [r.id for r in records] == expected_ids[name], name
        assert (report.rows, report.loaded, report.skipped) == (len(records), len(records), 0)
        for r in records:
            assert r.problem.count(IMAGE_TAG) == len(r.images) >= 1, (name, r.id, r.problem)
            assert r.meta["benchmark"] == name
            for image in r.images:  # paths are absolute, bytes decode
                assert decode_image(image).shape == (3, 8, 8)
                assert isinstance(image, bytes) or Path(image).is_absolute()


def test_records_survive_our_record_writer(bench_files: dict[str, Path], tmp_path: Path) -> None:
    """Benchmark records are ordinary records: write_records + load_records round-trips them."""
    for name, path in bench_files.items():
        records, _ = read(name, path)
        out = write_records(records, tmp_path / f"{name}.parquet")
        again = load_records(out, inline_images=True)
        assert [(r.id, r.problem, r.answer, r.answer_type) for r in again] == \
               [(r.id, r.problem, r.answer, r.answer_type) for r in records]


def test_mathvista_prompt_is_the_query_and_choice_answers_stay_text(bench_files: dict[str, Path]) -> None:
    records = {r.id: r for r in read("mathvista", bench_files["mathvista"])[0]}
    mc = records["2"]
    assert mc.problem.startswith(f"{IMAGE_TAG}\nHint: Please answer the question and provide the correct option")
    assert mc.problem.endswith("(A) parallel\n(B) perpendicular\n(C) neither")
    assert "You FIRST think" not in mc.problem  # the policy's prompt template appends the R1 instruction
    assert (mc.answer, mc.answer_type, mc.meta["choices"]) == ("perpendicular", "choice",
                                                               ["parallel", "perpendicular", "neither"])
    assert (records["1"].meta["unit"], records["3"].meta["precision"], records["3"].answer_type) == ("cm", 1, "float")


def test_mathvista_hf_parquet_uses_embedded_image_bytes_and_builds_missing_query(tmp_path: Path) -> None:
    row = dict(mathvista_rows()["2"], decoded_image={"bytes": png_bytes(), "path": "2.png"}, query=None)
    row["image"] = "images/absent.png"  # the HF export keeps the original path; bytes win
    records, _ = read("mathvista", write_parquet(tmp_path / "testmini.parquet", [row]))
    assert records[0].images == [png_bytes()]
    assert records[0].problem == (f"{IMAGE_TAG}\nQuestion: How are the two lines related?\nChoices:\n"
                                  "(A) parallel\n(B) perpendicular\n(C) neither")


def test_mathverse_uses_the_cot_query_and_keeps_written_choices(bench_files: dict[str, Path]) -> None:
    records = {r.id: r for r in read("mathverse", bench_files["mathverse"])[0]}
    assert records["5"].problem.startswith(f"{IMAGE_TAG}\nPlease first conduct reasoning")
    assert records["6"].meta["choices"] == {"A": "30°", "B": "60°", "C": "90°", "D": "120°"}
    assert records["7"].meta["choices"] == {}  # Vision Only: the options are in the image
    assert records["3"].meta["problem_version"] == "Vision Intensive"


def test_mathvision_maps_the_first_image_tag_and_lists_options(bench_files: dict[str, Path]) -> None:
    records = {r.id: r for r in read("mathvision", bench_files["mathvision"])[0]}
    assert records["1"].problem == f"How many bricks are missing in the wall?\n{IMAGE_TAG}"
    assert records["2"].problem.endswith("Choices:\n(A) 3\n(B) 5\n(C) 7\n(D) 9\n(E) 11")
    assert records["3"].problem == (f"When the ant {IMAGE_TAG} walks from home <image2>, where does it get to?"
                                    "\n<image3>\nChoices: A, B, C, D, E")
    assert records["4"].problem.startswith(f"{IMAGE_TAG}\nWhat part")  # no tag: the image goes first
    assert records["4"].meta["level"] == 3


def test_olympiadbench_prompt_images_and_tolerances(bench_files: dict[str, Path], tmp_path: Path) -> None:
    records = {r.id: r for r in read("olympiadbench", bench_files["olympiadbench"])[0]}
    single, multi, two_images = records["1"], records["2"], records["7"]
    assert single.problem.startswith("The following is an open-ended problem from an International Math "
                                     "competition. The answer of The problem should be a numerical value. ")
    assert single.problem.endswith(f"\nIn the figure {IMAGE_TAG}, find the value.")
    assert "multiple answers, each of them should be a numerical value" in multi.problem
    assert "Put all the answers in one \\boxed{}" in multi.problem
    assert len(two_images.images) == 2 and two_images.images[1] == png_bytes((0, 200, 0))
    assert (records["3"].meta["tolerances"], single.answer) == ([0.01], "\\frac{1}{2}")
    # The original release: <img_N> tags name files images/img_N.jpg next to the data file.
    row = dict(olympiad_rows()[0], question="See <img_17> and <img_18>.", image_1=None, id=9)
    write_png(tmp_path / "orig" / "images" / "img_17.png")
    (tmp_path / "orig" / "images" / "img_18.jpg").write_bytes(png_bytes())
    (tmp_path / "orig" / "data.json").write_text(json.dumps([row]), encoding="utf-8")
    rec = read("olympiadbench", tmp_path / "orig" / "data.json")[0][0]
    assert [Path(str(p)).name for p in rec.images] == ["img_17.png", "img_18.jpg"]


def test_wemath_ids_options_and_incomplete_composites(tmp_path: Path) -> None:
    records, _ = read("wemath", write_wemath(tmp_path))
    assert records[0].problem == (f"{IMAGE_TAG}\nQuestion of 2steps_1?\nOptions:\nA. 5cm\nB. 6cm\nC. 7cm\nD. 8cm\n"
                                  "E. No correct answer")
    assert records[0].meta["options"]["E"] == "No correct answer"
    rows = wemath_composite("2steps_1", 2) + wemath_composite("2steps_2", 2)[:2]  # 2steps_2 lacks its multi row
    rows[0]["image_path"] = "image/absent.png"  # ... and 2steps_1 loses a row to a bad image
    path = write_wemath(tmp_path, rows)
    with pytest.raises(RecordError) as err:
        read("wemath", path)
    text = str(err.value)
    assert "row 1: field 'image_path': image file not found" in text
    assert "row 4: field 'key': composite problem '2steps_2' has rows ['2steps_1', '2steps_2'], needs" in text
    assert "row 2: field 'key': composite problem '2steps_1'" in text  # its siblings go with it
    records, report = read("wemath", path, on_error="skip")
    assert (records, report.rows, report.skipped) == ([], 5, 5)


def test_mmk12_parquet_reads_subject_options_and_letter(bench_files: dict[str, Path]) -> None:
    records = read("mmk12", bench_files["mmk12"])[0]
    assert records[0].problem == f"{IMAGE_TAG}\nQuestion 1: what is it?\nA. 3\nB. 4\nC. 5\nD. 6"
    assert (records[0].answer, records[0].meta["subject"], records[0].meta["options"]["C"]) == ("C", "math", "5")
    assert records[0].images == [png_bytes()]


def test_bad_rows_are_reported_all_at_once_with_file_row_and_native_field(tmp_path: Path) -> None:
    rows = list(mathvista_rows().values())[:2]
    for pid in ("1", "2"):
        write_png(tmp_path / "images" / f"{pid}.png")
    bad = [
        dict(rows[0], pid="10", answer=None),                                  # row 3: missing answer
        dict(rows[1], pid="11", answer="diagonal"),                            # row 4: answer not a choice
        dict(rows[0], pid="12", image="images/missing.png"),                   # row 5: image file missing
        dict(rows[0], pid="13", question_type="open", precision="two"),        # row 6: two bad fields
        dict(rows[0], pid="1"),                                                # row 7: duplicate pid
        dict(rows[0], pid="14", answer="fourteen"),                            # row 8: integer answer not a number
    ]
    path = tmp_path / "testmini.json"
    path.write_text(json.dumps(rows + bad + ["not a row"]), encoding="utf-8")
    with pytest.raises(RecordError) as err:
        read("mathvista", path)
    lines = str(err.value).splitlines()[1:]
    assert lines == [
        f"{path}:row 3: field 'answer': missing required field",
        f"{path}:row 4: field 'answer': 'diagonal' is not one of the choices ['parallel', 'perpendicular', 'neither']",
        f"{path}:row 5: field 'image': image file not found: {tmp_path / 'images' / 'missing.png'}",
        f"{path}:row 6: field 'question_type': 'open' is not one of 'multi_choice', 'free_form'",
        f"{path}:row 6: field 'precision': expected an integer, got 'two'",
        f"{path}:row 7: field 'pid': duplicate id '1' (first seen in row 1)",
        f"{path}:row 8: field 'answer': 'fourteen' is not a number but answer_type is 'integer'",
        f"{path}:row 9: field '<row>': expected an object, got str",
    ]
    records, report = read("mathvista", path, on_error="skip")
    assert [r.id for r in records] == ["1", "2"]
    assert (report.rows, report.loaded, report.skipped, len(report.problems)) == (9, 2, 7, 8)
    assert describe_load("mathvista", report) == (
        f"mathvista: loaded 2 question(s) from {path}; skipped 7 row(s) (bad field 'answer': 3, "
        "bad field 'image': 1, bad field 'question_type': 1, bad field 'pid': 1, unreadable row: 1)")


def test_other_readers_name_their_native_fields(tmp_path: Path) -> None:
    write_png(tmp_path / "images" / "1.png")
    path = write_jsonl(tmp_path / "test.jsonl", [
        {"id": "1", "question": "q <image1>", "options": ["1", "2"], "answer": "C", "level": 1,
         "image": "images/1.png"},
        {"id": "2", "question": "q", "options": [], "answer": "3", "level": "Level 3", "image": "images/1.png"},
    ])
    with pytest.raises(RecordError, match=r"row 1: field 'answer': with 2 options the answer must be a letter A-B"
                                          r"(.|\n)*row 2: field 'level': expected an integer, got 'Level 3'"):
        read("mathvision", path)
    mmk = write_parquet(tmp_path / "mmk.parquet", [{"id": 1, "subject": "math", "question": "q\nA. 1\nB. 2",
                                                    "answer": "C", "image": {"bytes": b"not an image", "path": None}}])
    with pytest.raises(RecordError, match=r"field 'image': item 0: bytes are not an image PIL can read(.|\n)*"
                                          r"field 'answer': 'C' is not one of the options A, B written"):
        read("mmk12", mmk)
    bad_key = tmp_path / "wm.json"
    bad_key.write_text(json.dumps([wemath_row("x", "2steps_one")]), encoding="utf-8")
    with pytest.raises(RecordError, match="field 'key': expected '<N>steps_<k>'"):
        read("wemath", bad_key)


def test_unsupported_or_broken_files_fail_with_the_path(tmp_path: Path) -> None:
    bench = get_benchmark("mathverse")
    with pytest.raises(FileNotFoundError, match="benchmark file not found"):
        bench.read(tmp_path / "absent.json")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"x.csv: unsupported file type '.csv'"):
        bench.read(tmp_path / "x.csv")
    (tmp_path / "x.json").write_text("[{")
    with pytest.raises(ValueError, match=r"x.json: invalid JSON"):
        bench.read(tmp_path / "x.json")
