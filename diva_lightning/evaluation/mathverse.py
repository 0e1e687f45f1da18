r"""MathVerse (testmini: 788 problems x 5 versions = 3,940 rows): reader and rule-based scorer.

Native file: ``testmini.json`` (a list) or the HF parquet export. Fields used: ``sample_index`` (record id),
``problem_index``, ``problem_version`` (Text Dominant, Text Lite, Vision Intensive, Vision Dominant, Vision
Only), ``question`` (empty for Vision Only), ``query_cot`` / ``query_wo`` (the benchmark's own prompts),
``answer`` (a letter for multiple choice), ``question_type`` (``multi-choice``/``free-form``), ``image``
(a path, or HF image bytes), ``metadata``.

Prompt: the benchmark's chain-of-thought prompt ``query_cot`` (it asks for reasoning, then the option letter
or the value, and for Vision Only points at the question in the image), else ``query_wo``, else the question;
``<image>`` first. Options written in the question (``A:30°`` lines) are kept in ``meta["choices"]``.

Scoring on the last ``\boxed{}``: multiple choice is correct when the box names the answer letter (``B``,
``(b)``, ``B. 30°``) or spells the answer option's text; free-form answers are compared with math-verify
(``rewards.accuracy_reward``: ``\frac{1}{2}`` = ``0.5``, ``60^\circ`` = ``60``, ``x=3`` = ``3``).

Deviation from the official scorer (no GPT): MathVerse extracts the answer with GPT-4 and then asks GPT-4
whether it matches; we score the last box by rule (no box scores 0). Metrics: ``accuracy`` over all rows and
``accuracy/<problem_version>`` (e.g. ``accuracy/Vision Only``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.evaluation.answers import boxed_answer, chosen_option, hedged, inline_options
from diva_lightning.evaluation.base import Benchmark, Row, accuracy_by, place_single_image
from diva_lightning.rewards import accuracy_reward, choice_letter

VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only")
QUESTION_TYPES = ("multi-choice", "free-form")


def convert(row: Row) -> QuestionRecord | None:
    sample_index = row.text("sample_index", numbers=True)
    problem_index = row.text("problem_index", numbers=True, required=False)
    version = row.one_of("problem_version", VERSIONS)
    qtype = row.one_of("question_type", QUESTION_TYPES)
    question = row.text("question", required=False) or ""
    query_cot = row.text("query_cot", required=False)
    query_wo = row.text("query_wo", required=False)
    answer = row.text("answer", numbers=True)
    metadata = row.mapping("metadata")
    image = row.image("image")
    if qtype == "multi-choice" and answer is not None and choice_letter(answer, gold=True) is None:
        row.bad("answer", f"a multi-choice answer must be one option letter, got {answer!r}")
    prompt = next((q for q in (query_cot, query_wo, question) if q and q.strip()), None)
    if prompt is None:
        row.bad("query_cot", "no prompt: query_cot, query_wo and question are all empty")
    if row.problems or sample_index is None or answer is None or image is None or prompt is None:
        return None
    meta = {"benchmark": "mathverse", "problem_index": problem_index, "problem_version": version,
            "question_type": qtype, "choices": inline_options(question), "metadata": metadata}
    return QuestionRecord(id=sample_index, problem=place_single_image(prompt), answer=answer, images=[image],
                          answer_type="choice" if qtype == "multi-choice" else None, meta=meta)


def score(record: QuestionRecord, response: str) -> float:
    if record.meta["question_type"] == "multi-choice":
        pred = boxed_answer(response)
        gold = choice_letter(record.answer, gold=True)
        return float(pred is not None and chosen_option(pred, record.meta.get("choices") or {}) == gold)
    pred = boxed_answer(response)
    if pred is not None and hedged(pred, record.answer):
        return 0.0  # several answers offered for one (issue 22)
    return accuracy_reward(response, record.answer)


def metrics(records: Sequence[QuestionRecord], means: Mapping[str, float]) -> dict[str, float]:
    return accuracy_by(records, means, group=lambda r: str(r.meta["problem_version"]))


BENCHMARK = Benchmark(name="mathverse", title="MathVerse", id_field="sample_index", convert=convert, scorer=score,
                      metrics=metrics)
