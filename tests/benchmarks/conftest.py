"""Small fixture files in each benchmark's real native format, images drawn with PIL at test time."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image


def png_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path: Path, color: tuple[int, int, int] = (30, 30, 200)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(color))
    return path.name


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def box(answer: str) -> str:
    return f"<think>reasoning</think> The answer is \\boxed{{{answer}}}."


# ------------------------------------------------------------------------------------------------ MathVista
def mathvista_rows() -> dict[str, dict[str, Any]]:
    """testmini.json layout: an object keyed by pid (one row per answer type)."""
    hint_int = "Hint: Please answer the question requiring an integer answer and provide the final value, e.g., 1, 2, 3, at the end.\n"  # noqa: E501
    hint_mc = "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.\n"
    meta = {"split": "testmini", "language": "english", "source": "fixture", "category": "math-targeted-vqa",
            "task": "geometry problem solving", "context": "geometry diagram", "grade": "high school",
            "skills": ["geometry reasoning"]}

    def row(pid: str, **fields: Any) -> dict[str, Any]:
        base = {"pid": pid, "image": f"images/{pid}.png", "choices": None, "unit": None, "precision": None,
                "metadata": meta}
        return {**base, **fields}

    return {
        "1": row("1", question="How long is the red segment?", unit="cm", answer="14", question_type="free_form",
                 answer_type="integer",
                 query=hint_int + "Question: How long is the red segment? (Unit: cm)"),
        "2": row("2", question="How are the two lines related?", choices=["parallel", "perpendicular", "neither"],
                 answer="perpendicular", question_type="multi_choice", answer_type="text",
                 query=hint_mc + "Question: How are the two lines related?\nChoices:\n(A) parallel\n"
                                 "(B) perpendicular\n(C) neither"),
        "3": row("3", question="What is the ratio?", precision=1, answer="1.5", question_type="free_form",
                 answer_type="float", query="Question: What is the ratio?"),
        "4": row("4", question="What fraction is shaded?", precision=2, answer="0.25", question_type="free_form",
                 answer_type="float", query="Question: What fraction is shaded?"),
        "5": row("5", question="Between which two years is the peak?", answer="[2007, 2008]",
                 question_type="free_form", answer_type="list", query="Question: Between which two years?"),
        "6": row("6", question="How many people attended?", answer="1000", question_type="free_form",
                 answer_type="integer", query="Question: How many people attended?"),
    }


def write_mathvista(root: Path) -> Path:
    rows = mathvista_rows()
    for pid in rows:
        write_png(root / "images" / f"{pid}.png")
    path = root / "testmini.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ MathVerse
def write_mathverse(root: Path) -> Path:
    versions = ["Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only"]
    rows = []
    for k, version in enumerate(versions, start=1):
        question = "" if version == "Vision Only" else "The radius is 3 cm. Find L."
        rows.append({"sample_index": str(k), "problem_index": "685", "problem_version": version,
                     "question": question, "image": f"images_version_1-4/image_{k}.png", "answer": "14",
                     "question_type": "free-form",
                     "metadata": {"split": "testmini", "source": "fixture", "subject": "Solid Geometry",
                                  "subfield": "Length"},
                     "query_wo": f"Please directly answer the question.\nQuestion: {question}",
                     "query_cot": f"Please first conduct reasoning, and then answer the question and provide the "
                                  f"final value, e.g., 1, 2.5, 300, at the end.\nQuestion: {question}"})
        write_png(root / "images_version_1-4" / f"image_{k}.png")
    mc_question = "Find the angle.\nChoices:\nA:30°\nB:60°\nC:90°\nD:120°"
    for k, (version, question) in enumerate([("Text Dominant", mc_question), ("Vision Only", "")], start=6):
        rows.append({"sample_index": str(k), "problem_index": "7", "problem_version": version, "question": question,
                     "image": f"images_version_5/image_{k}.png", "answer": "B", "question_type": "multi-choice",
                     "metadata": {"subject": "Plane Geometry"},
                     "query_cot": "Please first conduct reasoning, and then answer the question and provide the "
                                  f"correct option letter, e.g., A, B, C, D, at the end.\nQuestion: {question}"})
        write_png(root / "images_version_5" / f"image_{k}.png")
    path = root / "testmini.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------- MathVision
def write_mathvision(root: Path) -> Path:
    def row(rid: str, question: str, answer: str, level: int, options: list[str] | None = None) -> dict[str, Any]:
        write_png(root / "images" / f"{rid}.png")
        return {"id": rid, "question": question, "options": options or [], "answer": answer, "solution": None,
                "level": level, "subject": "arithmetic", "image": f"images/{rid}.png"}

    rows = [
        row("1", "How many bricks are missing in the wall?\n<image1>", "6", 1),
        row("2", "Which number is hidden?\n<image1>", "B", 2, ["3", "5", "7", "9", "11"]),
        row("3", "When the ant <image1> walks from home <image2>, where does it get to?\n<image3>", "D", 2,
            ["A", "B", "C", "D", "E"]),
        row("4", "What part of the square is grey?", "\\frac{1}{3}", 3),
        row("5", "How long is the side?\n<image1>", "5", 3),
        row("6", "Which point is marked?\n<image1>", "(1,2)", 4),
    ]
    return write_jsonl(root / "test.jsonl", rows)


# -------------------------------------------------------------------------------------------- OlympiadBench
def olympiad_rows() -> list[dict[str, Any]]:
    """HF export of OE_MM_maths_en_COMP: image_N columns hold bytes, the question holds <image_N> tags."""
    def row(rid: int, answer: str, answer_type: str, *, multiple: bool = False, error: str | None = None,
            question: str = "In the figure <image_1>, find the value.") -> dict[str, Any]:
        return {"id": rid, "question": question, "solution": ["..."], "final_answer": [answer], "context": None,
                "image_1": {"bytes": png_bytes(), "path": None}, "image_2": None, "modality": "Multimodal",
                "difficulty": "Competition", "is_multiple_answer": multiple, "unit": None,
                "answer_type": answer_type, "error": error, "question_type": "Open-ended",
                "subfield": "Geometry", "subject": "Math", "language": "English"}

    return [
        row(1, "$\\frac{1}{2}$", "Numerical"),
        row(2, "$1, -3$", "Numerical", multiple=True),
        row(3, "$3.14$", "Numerical", error="0.01"),
        row(4, "$[1,3)$", "Interval"),
        row(5, "$2 x+1$", "Expression"),
        row(6, "$y=2x+1$", "Equation"),
        row(7, "$(2,3)$", "Tuple", question="Points <image_1> and <image_2> are shown. Find them."),
    ]


def write_olympiad(root: Path) -> Path:
    rows = olympiad_rows()
    rows[-1]["image_2"] = {"bytes": png_bytes((0, 200, 0)), "path": None}
    return write_parquet(root / "OE_MM_maths_en_COMP.parquet", rows)


# ---------------------------------------------------------------------------------------------------- WeMath
WEMATH_OPTION = "A. 5cm;B. 6cm;C. 7cm;D. 8cm;E. No correct answer"


def wemath_row(group: str, key: str, answer: str = "B") -> dict[str, Any]:
    return {"ID": group, "split": "testmini", "knowledge concept": "Perimeter", "question": f"Question of {key}?",
            "option": WEMATH_OPTION, "answer": answer, "image_path": "image/shared.png", "key": key,
            "question number": 1}


def wemath_composite(group: str, steps: int) -> list[dict[str, Any]]:
    return [wemath_row(group, f"{steps}steps_{k}") for k in range(1, steps + 1)] + \
        [wemath_row(group, f"{steps}steps_multi")]


def write_wemath(root: Path, rows: list[dict[str, Any]] | None = None) -> Path:
    write_png(root / "image" / "shared.png")
    rows = rows if rows is not None else wemath_composite("2steps_1", 2) + wemath_composite("3steps_1", 3)
    path = root / "testmini.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------- MMK12
def write_mmk12(root: Path) -> Path:
    rows = [{"id": k, "subject": subject, "question": f"Question {k}: what is it?\nA. 3\nB. 4\nC. 5\nD. 6",
             "answer": answer, "image": {"bytes": png_bytes(), "path": f"{k}.png"}}
            for k, subject, answer in [(1, "math", "C"), (2, "math", "A"), (3, "physics", "B"),
                                       (4, "chemistry", "D")]]
    return write_parquet(root / "test.parquet", rows)


@pytest.fixture
def bench_files(tmp_path: Path) -> dict[str, Path]:
    """Every benchmark's fixture file, each in its own directory."""
    writers = {"mathvista": write_mathvista, "mathverse": write_mathverse, "mathvision": write_mathvision,
               "olympiadbench": write_olympiad, "wemath": write_wemath, "mmk12": write_mmk12}
    out = {}
    for name, writer in writers.items():
        (tmp_path / name).mkdir()
        out[name] = writer(tmp_path / name)
    return out
