r"""MathVision (MATH-V; test 3,040 or testmini 304): reader and rule-based scorer.

Native file: ``test.jsonl`` / ``testmini.jsonl`` or the HF parquet export. Fields used: ``id`` (record id),
``question`` (with ``<image1>``-style tags), ``options`` (five options A-E, or empty), ``answer`` (a letter for
multiple choice, else a value or LaTeX), ``level`` (1-5), ``subject``; the image is ``decoded_image`` (HF
bytes) or else ``image`` (a path).

Images: every row has ONE picture that holds all the figures the question's tags refer to. The first
``<imageK>`` tag becomes our ``<image>``; later tags stay as written (a question without a tag gets
``<image>`` first). Options are listed after the question as ``(A) text`` lines (``Choices: A, B, C, D, E``
when the options are just the letters, i.e. drawn in the picture).

Scoring, as the official ``evaluation/utils.py`` (``find_math_answer``, ``is_equal``) on the last ``\boxed{}``:
lower-case; keep what follows the last ``=`` and the last ``\approx``; drop ``\text{}``-style wrappers,
``\left``/``\right``, degree signs, ``%``, ``$`` and spaces; strip a common unit written after a number
(``5cm``, ``12m^2``, ``3 hours``; a fixed list, so ``2x`` keeps its ``x``). Correct when the result equals
the answer or, for multiple choice, the chosen option's value: as strings, or as numbers rounded to 2 decimals
(constant LaTeX such as ``\frac{1}{3}`` or ``\sqrt{2}`` is evaluated), or element-wise for tuples. A letter in
the usual wrappers (``(B)``, ``B. 5``) names an option.

Deviations (no GPT judge is involved in MathVision, so these are about extraction only): the official script
falls back to phrases such as "the answer is" when there is no box, we score 0; it fails answers with a unit
(``5\text{ cm}`` turns into ``5{cm}``) and ``(B) 5``, which we accept. Metrics: ``accuracy`` and
``accuracy/level<k>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from diva_lightning.data.schema import IMAGE_TAG, QuestionRecord
from diva_lightning.evaluation.answers import boxed_answer, hedged, latex_value, strip_degrees, unwrap
from diva_lightning.evaluation.base import Benchmark, Row, accuracy_by
from diva_lightning.rewards.accuracy import choice_letter, named_letters

_TAG = re.compile(r"<image\d+>")
_UNITS = ("cm|mm|km|m|kg|mg|g|s|sec|min|h|hours?|ml|l|units?|degrees?|inch(?:es)?|ft|feet|yards?|miles?|"
          "meters?|metres?|dollars?|cents?|years?|days?|minutes?|seconds?")
_NUMBER_WITH_UNIT = re.compile(rf"([-+]?[\d.]+)(?:{_UNITS})(?:\^\{{?[23]\}}?)?")


def _letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


def build_problem(question: str, options: Sequence[str]) -> str:
    m = _TAG.search(question)
    text = f"{IMAGE_TAG}\n{question}" if m is None else question[: m.start()] + IMAGE_TAG + question[m.end():]
    letters = _letters(len(options))
    if options and list(options) == letters:
        return f"{text}\nChoices: {', '.join(letters)}"
    if options:
        text += "\nChoices:\n" + "\n".join(f"({letter}) {o}" for letter, o in zip(letters, options))
    return text


def convert(row: Row) -> QuestionRecord | None:
    rid = row.text("id", numbers=True)
    question = row.text("question")
    options = row.str_list("options", required=False) or []
    answer = row.text("answer", numbers=True)
    level = row.integer("level")
    subject = row.text("subject", required=False)
    image = row.image("decoded_image") if row.has("decoded_image") else row.image("image")
    if level is not None and not 1 <= level <= 5:
        row.bad("level", f"expected 1..5, got {level}")
    if options and answer is not None and answer.strip() not in _letters(len(options)):
        row.bad("answer", f"with {len(options)} options the answer must be a letter A-{chr(64 + len(options))}, "
                          f"got {answer!r}")
    if row.problems or rid is None or question is None or answer is None or image is None:
        return None
    meta = {"benchmark": "mathvision", "options": options, "level": level, "subject": subject}
    return QuestionRecord(id=rid, problem=build_problem(question, options), answer=answer.strip(),
                          images=[image], answer_type="choice" if options else None, meta=meta)


def normalise(s: str) -> str:
    """The official answer clean-up (see the module docstring)."""
    s = s.lower().replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.split("=")[-1].split("\\approx")[-1]
    s = strip_degrees(unwrap(s))
    for junk in ("\\,", "\\!", "\\%", "%", "$", " "):
        s = s.replace(junk, "")
    s = s.rstrip(".").lstrip(":")
    m = _NUMBER_WITH_UNIT.fullmatch(s)
    return m.group(1) if m else s


def _equal(gold: str, pred: str) -> bool:
    g, p = normalise(gold), normalise(pred)
    if not g or not p:
        return False
    if g == p:
        return True
    if g[0] + g[-1] in ("()", "[]") and p[0] + p[-1] == g[0] + g[-1] and "," in g:
        gs, ps = g[1:-1].split(","), p[1:-1].split(",")
        return len(gs) == len(ps) and all(_equal(a, b) for a, b in zip(gs, ps))
    a, b = latex_value(g), latex_value(p)
    return a is not None and b is not None and round(a, 2) == round(b, 2)


def score(record: QuestionRecord, response: str) -> float:
    pred = boxed_answer(response)
    if pred is None:
        return 0.0
    options = record.meta.get("options") or []
    if options:
        letters = _letters(len(options))
        named = choice_letter(pred)  # None for a box naming several letters
        if named is not None and named in letters:
            return float(named == record.answer)
        gold_text = options[letters.index(record.answer)]
        # the gold is the option's text here, not its letter: '1 and 3' answering '1 and 3' is one answer
        if len(named_letters(pred)) > 1 or hedged(pred, gold_text):
            return 0.0  # several answers offered for one (issue 22)
        return float(_equal(gold_text, pred))
    if hedged(pred, record.answer):
        return 0.0
    return float(_equal(record.answer, pred))


def metrics(records: Sequence[QuestionRecord], means: Mapping[str, float]) -> dict[str, float]:
    return accuracy_by(records, means, group=lambda r: f"level{r.meta['level']}")


BENCHMARK = Benchmark(name="mathvision", title="MathVision", id_field="id", convert=convert, scorer=score,
                      metrics=metrics)
