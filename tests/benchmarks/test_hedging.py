"""No hedging (issue 22): a box offering several answers where one is expected scores 0 in every scorer, and
option texts match with degree signs and LaTeX spacing aside (``50^\\circ`` picks ``50°``, as MATH-Vision does)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.evaluation import get_benchmark
from diva_lightning.evaluation.answers import alternatives, chosen_option, hedged, option_key

from .conftest import box
from .test_scorers import records  # noqa: F401  (the module-scoped fixture of native records)

CASES = [
    # (benchmark, record id, boxed answer, expected) -- the right answer alone scores 1 (test_scorers)
    ("mathvista", "2", "B or C", 0.0),
    ("mathvista", "2", "(B) or (C)", 0.0),
    ("mathvista", "2", "B, C", 0.0),
    ("mathvista", "2", "perpendicular or parallel", 0.0),
    ("mathvista", "1", "14 or 15", 0.0),
    ("mathverse", "6", "B or A", 0.0),
    ("mathverse", "6", "B and C", 0.0),
    ("mathverse", "6", "(B)(C)", 0.0),
    ("mathverse", "6", "60° or 30°", 0.0),
    ("mathverse", "6", "60^\\circ", 1.0),
    ("mathverse", "6", "60^{\\circ}", 1.0),
    ("mathverse", "1", "14 or 13", 0.0),
    ("mathverse", "1", "x = 13, x = 14", 0.0),
    ("mathvision", "1", "x = 7, x = 6", 0.0),
    ("mathvision", "1", "x = 7 \\text{ or } x = 6", 0.0),
    ("mathvision", "2", "B or C", 0.0),
    ("mathvision", "2", "5 or 7", 0.0),
    ("mathvision", "3", "D or E", 0.0),
    ("olympiadbench", "1", "0.5 or 0.6", 0.0),
    ("olympiadbench", "2", "1, -3", 1.0),
    ("wemath", "2steps_1|2steps_multi", "B or A", 0.0),
    ("wemath", "2steps_1|2steps_multi", "B, A", 0.0),
    ("mmk12", "1", "C or D", 0.0),
    ("mmk12", "1", "(C) 5 or (D) 6", 0.0),
    ("mmk12", "1", "C. 5", 1.0),
]


@pytest.mark.parametrize(("name", "rid", "boxed", "expected"), CASES,
                         ids=[f"{n}-{r}-{b}" for n, r, b, _ in CASES])
def test_hedged_answers_score_zero(records: dict[str, dict[str, QuestionRecord]],  # noqa: F811
                                   name: str, rid: str, boxed: str, expected: float) -> None:
    assert get_benchmark(name).score(records[name][rid], box(boxed)) == expected


def test_mathvista_choices_match_latex_degrees(records: dict[str, dict[str, QuestionRecord]]) -> None:  # noqa: F811
    base = records["mathvista"]["2"]
    record = replace(base, answer="50°", meta={**base.meta, "choices": ["40°", "50°", "60°"]})
    bench = get_benchmark("mathvista")
    for boxed, expected in [("50^\\circ", 1.0), ("50^{\\circ}", 1.0), ("50°", 1.0), ("B", 1.0), ("40^\\circ", 0.0),
                            ("50^\\circ or 60^\\circ", 0.0)]:
        assert bench.score(record, box(boxed)) == expected, boxed


def test_option_helpers() -> None:
    assert option_key("50^\\circ") == option_key("50°") == option_key("$50 ^{\\circ}$") == "50"
    assert option_key("\\dfrac{1}{2}") == option_key("\\frac{1}{2}")
    assert chosen_option("50^\\circ", {"A": "40°", "B": "50°"}) == "B"
    assert chosen_option("B or A", {"A": "40°", "B": "50°"}) is None
    assert alternatives("1,000") == ["1,000"] and alternatives("(1, 2)") == ["(1, 2)"]
    assert alternatives("3 \\text{ or } 4") == ["3", "4"] and alternatives("x=1; x=2") == ["x=1", "x=2"]
    assert hedged("x=4, x=3", "3") and hedged("B or C", "B")
    assert not hedged("3, 3", "3") and not hedged("1, 2", "1, 2") and not hedged("1+\\sqrt{2}, 1-\\sqrt{2}",
                                                                              "1 \\pm \\sqrt{2}")


def test_mathvision_option_text_with_a_connector_is_one_answer() -> None:
    """An option whose text holds 'and' or a comma, answered by its text or its letter, is one answer, not a hedge
    (the hedge check compares with the option's text, not with its letter)."""
    from diva_lightning.data.schema import QuestionRecord
    from diva_lightning.evaluation import mathvision

    options = ["1 and 3", "2", "1, 2", "3"]
    first = QuestionRecord(id="q", problem="p", answer="A", meta={"options": options})
    third = QuestionRecord(id="q", problem="p", answer="C", meta={"options": options})
    for response, record, expected in [("1 and 3", first, 1.0), ("(A) 1 and 3", first, 1.0), ("1, 2", third, 1.0),
                                       ("(C) 1, 2", third, 1.0), ("A or C", first, 0.0), ("2 or 3", third, 0.0),
                                       ("1 and 3", third, 0.0)]:
        assert mathvision.score(record, f"\\boxed{{{response}}}") == expected, response
