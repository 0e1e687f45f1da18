r"""MathVista (testmini, 1,000 questions): reader and rule-based scorer.

Native file: ``testmini.json`` (an object keyed by ``pid``) or the HF parquet export. Fields used: ``pid``
(record id), ``question``, ``query`` (the benchmark's own prompt: hint, question and ``(A) ...`` choices),
``choices``, ``answer`` (for multiple choice the choice *text*, not a letter), ``question_type``
(``multi_choice``/``free_form``), ``answer_type`` (``text``/``integer``/``float``/``list``), ``precision``,
``unit``, ``metadata``; the image is ``decoded_image`` (HF bytes) or else ``image`` (a path).

Prompt: the row's ``query`` with ``<image>`` first; when a file has no ``query`` it is rebuilt in the same
form (``Question: ...``, ``Choices:`` and ``(A) text`` lines).

Scoring follows the official ``calculate_score.normalize_extracted_answer`` on the last ``\boxed{}``:

- multiple choice: a parenthesised letter ``(b)`` anywhere, or a bare capital letter, names ``choices[i]``;
  anything else maps to the nearest choice by edit distance; correct when that choice is the answer text;
- integer: ``int(float(x))`` equals the answer;
- float: ``round(x, precision)`` equals ``round(answer, precision)``;
- list: the same numbers in the same order; text: the same text (case and spaces aside).

Before casting, ``$``, ``\text{}`` wrappers, degree signs, thousands commas and the row's ``unit`` are removed,
and a numeric fraction (``\frac{3}{4}``, ``3/4``) counts as its value.

Deviations from the official scorer (no GPT): the official pipeline lets GPT-4 extract the answer from free
text and strip units; we read only the last box (no box scores 0) and strip units by rule. Floats are compared
as rounded numbers (the official compares ``str(round(x, p))`` with the answer string, so an answer stored as
``"1.20"`` could never match); lists are compared as numbers instead of ``str(list)``; a bare ``B.`` also
counts as the letter. Metric: ``accuracy`` (mean over rows of the per-row mean@k).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.evaluation.answers import (
    boxed_answer,
    hedged,
    levenshtein,
    option_key,
    parse_number,
    strip_degrees,
    text_key,
    unwrap,
)
from diva_lightning.evaluation.base import Benchmark, Row, accuracy_by, place_single_image
from diva_lightning.rewards.accuracy import named_letters

QUESTION_TYPES = ("multi_choice", "free_form")
ANSWER_TYPES = ("text", "integer", "float", "list")
_RECORD_TYPE = {"integer": "integer", "float": "float", "text": "text", "list": "text"}
_PAREN_LETTER = re.compile(r"\(([a-zA-Z])\)")


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def build_query(question: str, choices: Sequence[str] | None) -> str:
    """The benchmark's prompt form, for files without a ``query`` field."""
    text = f"Question: {question}"
    if choices:
        text += "\nChoices:\n" + "\n".join(f"({letter}) {c}" for letter, c in zip(_letters(len(choices)), choices))
    return text


def convert(row: Row) -> QuestionRecord | None:
    pid = row.text("pid", numbers=True)
    question = row.text("question")
    answer = row.text("answer", numbers=True)
    qtype = row.one_of("question_type", QUESTION_TYPES)
    atype = row.one_of("answer_type", ANSWER_TYPES)
    choices = row.str_list("choices", required=qtype == "multi_choice")
    precision = row.integer("precision", required=atype == "float" and qtype == "free_form")
    unit = row.text("unit", required=False)
    query = row.text("query", required=False)
    metadata = row.mapping("metadata")
    image = row.image("decoded_image") if row.has("decoded_image") else row.image("image")
    if qtype == "multi_choice" and choices is not None:
        if len(choices) < 2:
            row.bad("choices", f"a multiple-choice question needs at least 2 choices, got {len(choices)}")
        elif answer is not None and answer not in choices:
            row.bad("answer", f"{answer!r} is not one of the choices {choices}")
    if qtype == "free_form" and atype in ("integer", "float") and answer is not None and parse_number(answer) is None:
        row.bad("answer", f"{answer!r} is not a number but answer_type is {atype!r}")
    if row.problems or pid is None or question is None or answer is None or image is None:
        return None
    prompt = query if query and query.strip() else build_query(question, choices)
    meta = {"benchmark": "mathvista", "question_type": qtype, "native_answer_type": atype, "choices": choices,
            "precision": precision, "unit": unit, "task": metadata.get("task"), "metadata": metadata}
    answer_type = "choice" if qtype == "multi_choice" else _RECORD_TYPE[str(atype)]
    return QuestionRecord(id=pid, problem=place_single_image(prompt), answer=answer, images=[image],
                          answer_type=answer_type, meta=meta)


def _choice_text(pred: str, choices: Sequence[str]) -> str | None:
    """The choice a boxed answer picks: a letter, the choice's text (degree signs and LaTeX spacing aside:
    ``50^\\circ`` picks ``50°``), else the nearest text by edit distance (the official fallback); None for a box
    naming several letters (a hedge)."""
    s = unwrap(pred)
    letters = _letters(len(choices))
    if len(named_letters(s)) > 1:
        return None
    found = _PAREN_LETTER.findall(s)
    if found:
        s = found[0].upper()
    if s.rstrip(".") in letters:
        return choices[letters.index(s.rstrip("."))]
    same = [c for c in choices if option_key(c) == option_key(s)]
    if len(same) == 1:
        return same[0]
    distances = [levenshtein(s, c) for c in choices]
    return choices[distances.index(min(distances))]


def _value_text(pred: str, unit: str | None) -> str:
    s = strip_degrees(unwrap(pred))
    if unit and s.lower().endswith(unit.strip().lower()):
        s = s[: len(s) - len(unit.strip())]
    return s.strip()


def _number_list(s: str) -> list[float] | None:
    items = [p for p in unwrap(s).strip("[]()").split(",") if p.strip()]
    values = [parse_number(p) for p in items]
    return None if not values or any(v is None for v in values) else [v for v in values if v is not None]


def score(record: QuestionRecord, response: str) -> float:
    pred = boxed_answer(response)
    if pred is None:
        return 0.0
    meta = record.meta
    if meta["native_answer_type"] != "list" and hedged(pred, record.answer):
        return 0.0  # several answers offered for one (issue 22)
    if meta["question_type"] == "multi_choice":
        return float(_choice_text(pred, meta["choices"]) == record.answer)
    kind, value = meta["native_answer_type"], _value_text(pred, meta.get("unit"))
    if kind == "list":
        return float(_number_list(value) is not None and _number_list(value) == _number_list(record.answer))
    if kind == "text":
        return float(text_key(value) == text_key(record.answer))
    got, gold = parse_number(value), parse_number(record.answer)
    if got is None or gold is None:
        return 0.0
    if kind == "integer":
        return float(int(got) == int(gold))
    precision = int(meta["precision"])
    return float(round(got, precision) == round(gold, precision))


def metrics(records: Sequence[QuestionRecord], means: Mapping[str, float]) -> dict[str, float]:
    return accuracy_by(records, means)


BENCHMARK = Benchmark(name="mathvista", title="MathVista", id_field="pid", convert=convert, scorer=score,
                      metrics=metrics)
