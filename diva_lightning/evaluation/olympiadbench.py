r"""OlympiadBench (the paper uses ``OE_MM_maths_en_COMP``, ~150 open-ended problems with images).

Native file: the HF export of one subset (parquet, or the JSON list of the original release). Fields used:
``id`` (record id), ``question``, ``context`` (physics), ``final_answer`` (a list; the official judge uses its
first entry, which may hold several comma-separated answers), ``is_multiple_answer``, ``unit``,
``answer_type`` (Numerical, Expression, Equation, Interval, Tuple, or a comma-separated mix), ``error`` (the
tolerance, comma-separated per answer), ``subfield``.

Images: a ``<image_N>`` tag in the question is the field ``image_N`` (HF bytes or a path); a ``<img_N>`` tag
(original release) is the field ``img_N`` when present, else the file ``images/img_N.jpg`` (or ``.png``) next
to the data file, as the official inference code looks it up. Each tag occurrence becomes one ``<image>``.

Prompt: the official English prompt (``inference/code/evaluators/evaluator.py``): the competition sentence,
the answer-type sentence, and the multiple-answer and unit instructions; its closing "So the final answer is
\boxed{}" sentence is left to the policy's R1 instruction.

Scoring: ``olympiad_judge.judge(final_answer[0], last box, tolerances)``; ``Tuple`` answers use the default
tolerance, as the official ``judge.py`` does. Deviation: the official judge concatenates every ``\boxed{}`` of
the response; we pass only the last one (R1 responses box one final answer; several answers go in one box,
comma-separated, as the prompt says). No box scores 0. Metric: ``accuracy``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from diva_lightning.data.schema import IMAGE_TAG, ImageRef, QuestionRecord
from diva_lightning.evaluation.answers import boxed_answer, hedged
from diva_lightning.evaluation.base import Benchmark, Row, accuracy_by
from diva_lightning.evaluation.olympiad_judge import DEFAULT_TOLERANCE, judge

_TAG = re.compile(r"<(image|img)_(\d+)>")
_TYPE_TEXT = {"Numerical": "a numerical value", "Expression": "an expression", "Equation": "an equation",
              "Interval": "an interval"}
_KNOWN_TYPES = (*_TYPE_TEXT, "Tuple", "Need_human_evaluate")


def _type_text(answer_type: str) -> str:
    return next((text for name, text in _TYPE_TEXT.items() if name in answer_type), "a value")


def answer_type_sentence(answer_type: str, multiple: bool) -> str:
    """The official prompt's sentence about the answer's type ('' for tuples)."""
    if "Tuple" in answer_type or "Need_human_evaluate" in answer_type:
        return ""
    if not multiple:
        return f"The answer of The problem should be {_type_text(answer_type)}. "
    kinds = [_type_text(t) for t in answer_type.split(",")]
    if len(set(kinds)) == 1:
        return f"The problem has multiple answers, each of them should be {kinds[0]}. "
    return f"The problem has multiple answers, with the answers in order being {', '.join(kinds)}. "


def build_prompt(question: str, answer_type: str, multiple: bool, unit: str | None, subject: str) -> str:
    text = (f"The following is an open-ended problem from an International {subject} competition. "
            f"{answer_type_sentence(answer_type, multiple)}Please calculate the answer according to the given "
            "requirements and the information provided. Please use LaTeX format to represent the variables "
            "and formulas used in the solution process and results.")
    if multiple:
        text += " Put all the answers in one \\boxed{}, separated by commas."
    if unit:
        text += " Note that the unit of the answer should not be included in \\boxed{}."
    return f"{text}\n{question}"


def _tolerances(row: Row) -> list[float] | None:
    value = row.data.get("error")
    if value is None or value == "":
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)]
    try:
        return [float(p) if p.strip() else DEFAULT_TOLERANCE for p in str(value).split(",")]
    except ValueError:
        row.bad("error", f"expected a tolerance or comma-separated tolerances, got {value!r}")
        return None


def _tag_image(row: Row, kind: str, n: str) -> ImageRef | None:
    field = f"{kind}_{n}"
    if row.has(field):
        return row.image(field)
    if kind == "image":
        row.bad(field, f"missing: the question shows <{field}>")
        return None
    candidates = [f"images/{field}.{ext}" for ext in ("jpg", "png")]
    return row.image_file("question", next((c for c in candidates if (row.base_dir / c).is_file()), candidates[0]))


def _images(row: Row, question: str) -> tuple[str, list[ImageRef]]:
    """Each tag occurrence -> one ``<image>`` and its image; untagged ``image_K`` fields go first."""
    refs = [_tag_image(row, kind, n) for kind, n in _TAG.findall(question)]
    problem = _TAG.sub(IMAGE_TAG, question)
    if not refs:
        untagged = [f"image_{k}" for k in range(1, 10) if row.has(f"image_{k}")]
        refs = [row.image(field) for field in untagged]
        problem = IMAGE_TAG * len(untagged) + ("\n" if untagged else "") + problem
    return problem, [ref for ref in refs if ref is not None]


def convert(row: Row) -> QuestionRecord | None:
    rid = row.text("id", numbers=True)
    question = row.text("question")
    context = row.text("context", required=False)
    final_answer = row.str_list("final_answer")
    multiple = row.flag("is_multiple_answer")
    unit = row.text("unit", required=False)
    answer_type = row.text("answer_type")
    subject = row.text("subject", required=False) or "Math"
    tolerances = _tolerances(row)
    if final_answer is not None and not final_answer:
        row.bad("final_answer", "empty list")
    if answer_type is not None and not any(t in answer_type for t in _KNOWN_TYPES):
        row.bad("answer_type", f"{answer_type!r} names none of {', '.join(_KNOWN_TYPES)}")
    if question is None:
        return None
    full_question = f"{context}\n{question}" if context else question
    problem, images = _images(row, full_question)
    if row.problems or rid is None or not final_answer or answer_type is None:
        return None
    meta = {"benchmark": "olympiadbench", "final_answer": final_answer, "is_multiple_answer": multiple,
            "unit": unit, "olympiad_answer_type": answer_type, "tolerances": tolerances,
            "subfield": row.data.get("subfield")}
    prompt = build_prompt(problem, answer_type, multiple, unit, "Physics" if subject == "Physics" else "Math")
    return QuestionRecord(id=rid, problem=prompt, answer=final_answer[0].strip().strip("$").strip(),
                          images=images, answer_type="expression", meta=meta)


def score(record: QuestionRecord, response: str) -> float:
    pred = boxed_answer(response)
    if pred is None:
        return 0.0
    meta = record.meta
    if hedged(pred, meta["final_answer"][0]):
        return 0.0  # several answers offered for one (issue 22)
    tolerances = meta.get("tolerances")
    if "Tuple" in meta["olympiad_answer_type"] or not tolerances:
        tolerances = [DEFAULT_TOLERANCE]
    return float(judge(meta["final_answer"][0], pred, tolerances))


def metrics(records: Sequence[QuestionRecord], means: Mapping[str, float]) -> dict[str, float]:
    return accuracy_by(records, means)


BENCHMARK = Benchmark(name="olympiadbench", title="OlympiadBench", id_field="id", convert=convert, scorer=score,
                      metrics=metrics)
