r"""MMK12 (test: 2,000 multiple-choice questions, 500 each of math, physics, chemistry, biology).

Native file: the HF parquet export (or a JSON / JSONL dump of it). Fields used: ``id`` (record id),
``question`` (the options are written in it, one ``A. text`` line each), ``answer`` (the letter), ``subject``,
and the image: ``image`` (HF bytes or a path) or ``images`` (a list of them).

Prompt: the question as written; ``<image>`` tags the question already holds are kept, otherwise one per image
goes first.

Scoring: the last ``\boxed{}`` names the answer letter (``B``, ``(b)``, ``B. 3 N``) or spells the answer
option's text. MMK12 has no official scorer beyond "letter in the box" (MM-EUREKA trains and validates with a
rule reward); accepting the option's text is our addition. No box scores 0. Metrics: ``accuracy`` and
``accuracy/<subject>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from diva_lightning.data.schema import IMAGE_TAG, QuestionRecord
from diva_lightning.evaluation.answers import boxed_answer, chosen_option, inline_options
from diva_lightning.evaluation.base import Benchmark, Row, accuracy_by
from diva_lightning.rewards import choice_letter


def convert(row: Row) -> QuestionRecord | None:
    rid = row.text("id", numbers=True)
    question = row.text("question")
    answer = row.text("answer")
    subject = row.text("subject")
    images = row.image_list("image") if row.has("image") or not row.has("images") else row.image_list("images")
    letter = choice_letter(answer, gold=True) if answer is not None else None
    options = inline_options(question) if question is not None else {}
    if answer is not None and letter is None:
        row.bad("answer", f"expected one option letter, got {answer!r}")
    elif letter is not None and options and letter not in options:
        row.bad("answer", f"{answer!r} is not one of the options {', '.join(options)} written in the question")
    if question is not None and images is not None and question.count(IMAGE_TAG) not in (0, len(images)):
        row.bad("question", f"has {question.count(IMAGE_TAG)} '{IMAGE_TAG}' tag(s) but the row has "
                            f"{len(images)} image(s)")
    if row.problems or rid is None or question is None or letter is None or subject is None or images is None:
        return None
    problem = question if IMAGE_TAG in question else IMAGE_TAG * len(images) + "\n" + question
    meta = {"benchmark": "mmk12", "subject": subject, "options": options}
    return QuestionRecord(id=rid, problem=problem, answer=letter, images=images, answer_type="choice", meta=meta)


def score(record: QuestionRecord, response: str) -> float:
    pred = boxed_answer(response)
    return float(pred is not None and chosen_option(pred, record.meta["options"]) == record.answer)


def metrics(records: Sequence[QuestionRecord], means: Mapping[str, float]) -> dict[str, float]:
    return accuracy_by(records, means, group=lambda r: str(r.meta["subject"]))


BENCHMARK = Benchmark(name="mmk12", title="MMK12", id_field="id", convert=convert, scorer=score,
                      metrics=metrics)
