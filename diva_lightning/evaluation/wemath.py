r"""WeMath (testmini: 1,740 rows = 525 composite problems): reader, scorer and four-dimensional metrics.

Native file: ``testmini.json`` (a list) or the HF parquet export. Fields used: ``ID`` (the composite problem,
shared by its rows), ``key`` (``2steps_1``, ``2steps_2``, ``2steps_multi``, ``3steps_1..3``, ``3steps_multi``),
``question``, ``option`` (one string ``"A. ...;B. ..."``), ``answer`` (a letter), ``image_path`` (a path) or
``image`` (HF bytes), ``knowledge concept``. Record id: ``"<ID>|<key>"`` (``2steps_1|2steps_multi``).
A composite problem must have all its rows (``Nsteps_1..N`` and ``Nsteps_multi``); rows of an incomplete one
are reported (field ``key``) and, when skipping, dropped together.

Prompt: ``<image>``, the question, then ``Options:`` and one ``A. text`` line per option.

Scoring: the last ``\boxed{}`` names the answer letter (``B``, ``(b)``, ``B. 6cm``) or spells its option text.
Metrics, per composite problem with one-step rows ``s_i`` and the multi-step row ``m`` (official
``four_dimensional_metrics.py``): IK = some s_i wrong and m wrong; IG = all s_i right and m wrong;
CM_strict = all s_i right and m right; CM_loose = some s_i right and m right; RM_strict = some s_i wrong and
m right; RM_loose = all s_i wrong and m right. ``IK``, ``IG``, ``CM_*`` are shares of the N composite
problems; ``RM_x`` = RM_x / (CM_x + RM_x) (0 when that is 0); ``score_x = (N - 0.5 IG - RM_x - IK) / N`` on
counts; ``accuracy`` is the plain mean over rows.

Deviations: the official script reads the letter after the word "Answer"; we read the last box (no box
scores 0). It divides by a fixed N = 525; we use the number of composite problems in the file (525 for the full
testmini). With several samples per row (mean@k), each row's mean p is its chance of being right and the
counts are expectations with rows independent (all right = prod p_i, ...) and the RM ratios are ratios of
those expected counts; with one sample this is exactly the official count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.evaluation.answers import boxed_answer, chosen_option
from diva_lightning.evaluation.base import Benchmark, Row, place_single_image

_KEY = re.compile(r"(\d+)steps_(\d+|multi)")
_OPTION = re.compile(r"([A-H])\.\s*(.*?)\s*(?=;\s*[A-H]\.|$)", re.DOTALL)
METRIC_KEYS = ("accuracy", "score_strict", "score_loose", "IK", "IG", "CM_strict", "CM_loose", "RM_strict",
               "RM_loose")


def parse_options(option: str) -> dict[str, str]:
    """``"A. 5cm;B. 6cm"`` -> ``{"A": "5cm", "B": "6cm"}``."""
    return {m.group(1): m.group(2) for m in _OPTION.finditer(option)}


def convert(row: Row) -> QuestionRecord | None:
    group = row.text("ID", numbers=True)
    key = row.text("key")
    question = row.text("question")
    option = row.text("option")
    answer = row.text("answer")
    image = row.image("image") if row.has("image") else row.image("image_path")
    m = _KEY.fullmatch(key or "")
    if key is not None and m is None:
        row.bad("key", f"expected '<N>steps_<k>' or '<N>steps_multi', got {key!r}")
    options = parse_options(option) if option is not None else {}
    if option is not None and len(options) < 2:
        row.bad("option", f"expected 'A. ...;B. ...', got {option!r}")
    elif answer is not None and options and answer.strip() not in options:
        row.bad("answer", f"{answer!r} is not one of the option letters {', '.join(options)}")
    if row.problems or m is None or group is None or question is None or answer is None or image is None:
        return None
    problem = f"{question}\nOptions:\n" + "\n".join(f"{letter}. {text}" for letter, text in options.items())
    meta = {"benchmark": "wemath", "group": group, "key": key, "steps": int(m.group(1)), "options": options,
            "knowledge_concept": row.data.get("knowledge concept")}
    return QuestionRecord(id=f"{group}|{key}", problem=place_single_image(problem), answer=answer.strip(),
                          images=[image], answer_type="choice", meta=meta)


def _expected_keys(steps: int) -> list[str]:
    return sorted([f"{steps}steps_{k}" for k in range(1, steps + 1)] + [f"{steps}steps_multi"])


def check_composites(kept: Sequence[tuple[int, QuestionRecord]]) -> list[tuple[int, str, str]]:
    """Rows of composite problems that miss a row or mix step counts, as (row, field, message)."""
    groups: dict[str, list[tuple[int, QuestionRecord]]] = {}
    for n, record in kept:
        groups.setdefault(record.meta["group"], []).append((n, record))
    problems: list[tuple[int, str, str]] = []
    for group, members in groups.items():
        keys = sorted(r.meta["key"] for _, r in members)
        steps = {r.meta["steps"] for _, r in members}
        expected = _expected_keys(steps.pop()) if len(steps) == 1 else []
        if keys != expected:
            message = f"composite problem {group!r} has rows {keys}, needs {expected or 'one step count'}"
            problems.extend((n, "key", message) for n, _ in members)
    return problems


def score(record: QuestionRecord, response: str) -> float:
    pred = boxed_answer(response)
    return float(pred is not None and chosen_option(pred, record.meta["options"]) == record.answer)


def metrics(records: Sequence[QuestionRecord], means: Mapping[str, float]) -> dict[str, float]:
    if not records:
        raise ValueError("no records to aggregate")
    subs: dict[str, list[float]] = {}
    multi: dict[str, float] = {}
    for r in records:
        if r.meta["key"].endswith("_multi"):
            multi[r.meta["group"]] = means[r.id]
        else:
            subs.setdefault(r.meta["group"], []).append(means[r.id])
    groups = sorted(set(subs) | set(multi))
    incomplete = [g for g in groups if g not in multi or g not in subs]
    if incomplete:
        raise ValueError(f"composite problems without one-step or multi-step rows: {incomplete[:10]}")
    counts = dict.fromkeys(("IK", "IG", "CM_strict", "CM_loose", "RM_strict", "RM_loose"), 0.0)
    for g in groups:
        all_right = math.prod(subs[g])
        all_wrong = math.prod(1.0 - p for p in subs[g])
        m = multi[g]
        counts["IK"] += (1.0 - all_right) * (1.0 - m)
        counts["IG"] += all_right * (1.0 - m)
        counts["CM_strict"] += all_right * m
        counts["CM_loose"] += (1.0 - all_wrong) * m
        counts["RM_strict"] += (1.0 - all_right) * m
        counts["RM_loose"] += all_wrong * m
    n = len(groups)

    def rote(kind: str) -> float:
        denominator = counts[f"CM_{kind}"] + counts[f"RM_{kind}"]
        return counts[f"RM_{kind}"] / denominator if denominator > 0 else 0.0

    out = {
        "accuracy": sum(means[r.id] for r in records) / len(records),
        "score_strict": (n - 0.5 * counts["IG"] - counts["RM_strict"] - counts["IK"]) / n,
        "score_loose": (n - 0.5 * counts["IG"] - counts["RM_loose"] - counts["IK"]) / n,
        "IK": counts["IK"] / n,
        "IG": counts["IG"] / n,
        "CM_strict": counts["CM_strict"] / n,
        "CM_loose": counts["CM_loose"] / n,
        "RM_strict": rote("strict"),
        "RM_loose": rote("loose"),
    }
    return {k: out[k] for k in METRIC_KEYS}


BENCHMARK = Benchmark(name="wemath", title="WeMath", id_field="ID", convert=convert, scorer=score,
                      metrics=metrics, cross_row_check=check_composites, headline="score_strict")
