"""Every normalisation rule of every scorer: a case that passes and a near miss that fails.

Records come from the native fixture files (conftest), so the scorers see exactly what the readers make.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.evaluation import get_benchmark
from diva_lightning.evaluation.olympiad_judge import judge

from .conftest import box, write_mathverse, write_mathvision, write_mathvista, write_mmk12, write_olympiad, write_wemath

WRITERS = {"mathvista": write_mathvista, "mathverse": write_mathverse, "mathvision": write_mathvision,
           "olympiadbench": write_olympiad, "wemath": write_wemath, "mmk12": write_mmk12}


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, QuestionRecord]]:
    out = {}
    for name, writer in WRITERS.items():
        root = tmp_path_factory.mktemp(name)
        out[name] = {r.id: r for r in get_benchmark(name).read(writer(root))[0]}
    return out


def check(records: dict[str, dict[str, QuestionRecord]], name: str, rid: str, boxed: str, expected: float) -> None:
    bench = get_benchmark(name)
    assert bench.score(records[name][rid], box(boxed)) == expected, (name, rid, boxed)


MATHVISTA = [
    # (pid, boxed answer, expected)  -- rule in the id; choices of pid 2: parallel, perpendicular, neither
    pytest.param("2", "B", 1.0, id="letter-names-choice-text"),
    pytest.param("2", "C", 0.0, id="letter-names-other-choice"),
    pytest.param("2", "(b)", 1.0, id="parenthesised-lowercase-letter"),
    pytest.param("2", "(a)", 0.0, id="parenthesised-wrong-letter"),
    pytest.param("2", "perpendicular", 1.0, id="choice-text"),
    pytest.param("2", "parallel", 0.0, id="other-choice-text"),
    pytest.param("2", "perpendiculr", 1.0, id="nearest-choice-by-edit-distance"),
    pytest.param("2", "paralel", 0.0, id="nearest-choice-is-wrong"),
    pytest.param("1", "14.0", 1.0, id="integer-cast-of-float-text"),
    pytest.param("1", "15", 0.0, id="wrong-integer"),
    pytest.param("1", "14 \\text{cm}", 1.0, id="row-unit-stripped"),
    pytest.param("1", "14 m", 0.0, id="other-unit-not-stripped"),
    pytest.param("6", "1,000", 1.0, id="thousands-comma"),
    pytest.param("6", "1.000", 0.0, id="decimal-point-is-not-thousands"),
    pytest.param("3", "1.54", 1.0, id="float-rounded-to-precision-1"),
    pytest.param("3", "1.56", 0.0, id="float-rounds-to-other-value"),
    pytest.param("3", "\\frac{3}{2}", 1.0, id="numeric-fraction"),
    pytest.param("3", "\\frac{3}{4}", 0.0, id="wrong-fraction"),
    pytest.param("4", "0.250", 1.0, id="float-precision-2"),
    pytest.param("4", "0.26", 0.0, id="float-precision-2-near-miss"),
    pytest.param("5", "[2007, 2008]", 1.0, id="list"),
    pytest.param("5", "2007, 2008", 1.0, id="list-without-brackets"),
    pytest.param("5", "[2008, 2007]", 0.0, id="list-order-matters"),
]


@pytest.mark.parametrize(("rid", "boxed", "expected"), MATHVISTA)
def test_mathvista(records: dict[str, dict[str, QuestionRecord]], rid: str, boxed: str, expected: float) -> None:
    check(records, "mathvista", rid, boxed, expected)


MATHVERSE = [
    # sample 1: free-form 14; sample 6: choices A:30° B:60° ..., answer B; sample 7: Vision Only, answer B
    pytest.param("1", "14", 1.0, id="free-form-value"),
    pytest.param("1", "\\frac{28}{2}", 1.0, id="free-form-equal-expression"),
    pytest.param("1", "13", 0.0, id="free-form-wrong-value"),
    pytest.param("6", "B", 1.0, id="letter"),
    pytest.param("6", "(b)", 1.0, id="wrapped-lowercase-letter"),
    pytest.param("6", "B. 60°", 1.0, id="letter-with-option-text"),
    pytest.param("6", "60°", 1.0, id="option-text"),
    pytest.param("6", "A", 0.0, id="wrong-letter"),
    pytest.param("6", "30°", 0.0, id="wrong-option-text"),
    pytest.param("7", "B", 1.0, id="vision-only-letter"),
    pytest.param("7", "60°", 0.0, id="vision-only-options-unknown-text-fails"),
]


@pytest.mark.parametrize(("rid", "boxed", "expected"), MATHVERSE)
def test_mathverse(records: dict[str, dict[str, QuestionRecord]], rid: str, boxed: str, expected: float) -> None:
    check(records, "mathverse", rid, boxed, expected)


MATHVISION = [
    # id 1: 6; id 2: options 3,5,7,9,11 answer B; id 3: letter options, answer D; id 4: \frac{1}{3};
    # id 5: 5; id 6: (1,2)
    pytest.param("1", "6", 1.0, id="value"),
    pytest.param("1", "x = 6", 1.0, id="after-last-equals"),
    pytest.param("1", "x = 7", 0.0, id="after-last-equals-wrong"),
    pytest.param("1", "n = 2 \\cdot 3 = 6", 1.0, id="after-the-last-of-several-equals"),
    pytest.param("1", "6 = 2 + 2", 0.0, id="value-before-equals-ignored"),
    pytest.param("1", "\\approx 6.0", 1.0, id="after-approx"),
    pytest.param("5", "5 \\text{ cm}", 1.0, id="text-unit-stripped"),
    pytest.param("5", "5cm", 1.0, id="bare-unit-stripped"),
    pytest.param("5", "6 \\text{ cm}", 0.0, id="unit-stripped-wrong-value"),
    pytest.param("5", "5x", 0.0, id="variable-is-not-a-unit"),
    pytest.param("5", "5^\\circ", 1.0, id="degree-sign-stripped"),
    pytest.param("4", "0.333", 1.0, id="two-decimal-rounding"),
    pytest.param("4", "0.33", 1.0, id="two-decimal-rounding-short"),
    pytest.param("4", "0.34", 0.0, id="two-decimal-rounding-near-miss"),
    pytest.param("4", "\\dfrac{1}{3}", 1.0, id="dfrac-equals-frac"),
    pytest.param("2", "5", 1.0, id="chosen-option-value"),
    pytest.param("2", "7", 0.0, id="other-option-value"),
    pytest.param("2", "(B)", 1.0, id="option-letter"),
    pytest.param("2", "C", 0.0, id="wrong-option-letter"),
    pytest.param("3", "d", 1.0, id="lowercase-letter"),
    pytest.param("3", "E", 0.0, id="letter-near-miss"),
    pytest.param("6", "(1, 2)", 1.0, id="tuple-elementwise"),
    pytest.param("6", "(2, 1)", 0.0, id="tuple-order"),
]


@pytest.mark.parametrize(("rid", "boxed", "expected"), MATHVISION)
def test_mathvision(records: dict[str, dict[str, QuestionRecord]], rid: str, boxed: str, expected: float) -> None:
    check(records, "mathvision", rid, boxed, expected)


OLYMPIAD = [
    # id 1: \frac{1}{2}; 2: "1, -3" (multiple); 3: 3.14 with error 0.01; 4: [1,3); 5: 2x+1; 6: y=2x+1; 7: (2,3)
    pytest.param("1", "0.5", 1.0, id="number-equals-fraction"),
    pytest.param("1", "0.51", 0.0, id="default-tolerance-is-tight"),
    pytest.param("1", "\\frac{2}{4}", 1.0, id="equal-fraction"),
    pytest.param("3", "3.145", 1.0, id="within-row-tolerance"),
    pytest.param("3", "3.16", 0.0, id="outside-row-tolerance"),
    pytest.param("3", "\\pi", 1.0, id="pi-within-tolerance"),
    pytest.param("2", "-3, 1", 1.0, id="multiple-answers-any-order"),
    pytest.param("2", "x=1, x=-3", 1.0, id="multiple-answers-right-hand-sides"),
    pytest.param("2", "-3", 0.0, id="multiple-answers-one-missing"),
    pytest.param("2", "1, 3", 0.0, id="multiple-answers-one-wrong"),
    pytest.param("4", "[1, 3)", 1.0, id="interval"),
    pytest.param("4", "x \\in [1,3)", 1.0, id="interval-after-in"),
    pytest.param("4", "[1, 3]", 0.0, id="interval-bracket-differs"),
    pytest.param("5", "1 + 2x", 1.0, id="expression"),
    pytest.param("5", "2x - 1", 0.0, id="expression-near-miss"),
    pytest.param("6", "2y = 4x + 2", 1.0, id="equation-up-to-factor"),
    pytest.param("6", "y = 2x - 1", 0.0, id="equation-near-miss"),
    pytest.param("7", "(2, 3)", 1.0, id="tuple"),
    pytest.param("7", "(3, 2)", 0.0, id="tuple-order"),
]


@pytest.mark.parametrize(("rid", "boxed", "expected"), OLYMPIAD)
def test_olympiadbench(records: dict[str, dict[str, QuestionRecord]], rid: str, boxed: str, expected: float) -> None:
    check(records, "olympiadbench", rid, boxed, expected)


def test_olympiad_judge_rules_beyond_the_fixture() -> None:
    assert judge("25", "0.25")  # percentages: gold/100 and gold*100 also count, as in the official judge
    assert judge("1 \\pm \\sqrt{2}", "1 - \\sqrt{2}, 1 + \\sqrt{2}")
    assert not judge("1 \\pm \\sqrt{2}", "1 + \\sqrt{2}")
    assert judge("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty,1)\\cup(2,\\infty)")
    assert not judge("(-\\infty, 1) \\cup (2, \\infty)", "(-\\infty,1]\\cup(2,\\infty)")
    assert judge("1.5, 2", "2.04, 1.5", [1e-8, 0.05])  # each gold answer keeps its own tolerance
    assert not judge("1.5, 2", "2.04, 1.5", [0.05, 1e-8])
    assert not judge("10^{10^{10}}", "10^{10^{10}} + 1")  # towers are refused, not evaluated


def test_olympiad_reads_only_the_last_box(records: dict[str, dict[str, QuestionRecord]]) -> None:
    bench, record = get_benchmark("olympiadbench"), records["olympiadbench"]["2"]
    assert bench.score(record, "So \\boxed{1} and \\boxed{-3}.") == 0.0  # official: joins every box
    assert bench.score(record, "So \\boxed{1, -3}.") == 1.0


WEMATH = [
    pytest.param("B", 1.0, id="letter"),
    pytest.param("(b)", 1.0, id="wrapped-lowercase-letter"),
    pytest.param("6cm", 1.0, id="option-text"),
    pytest.param("6 cm", 1.0, id="option-text-spacing"),
    pytest.param("A", 0.0, id="wrong-letter"),
    pytest.param("7cm", 0.0, id="wrong-option-text"),
]


@pytest.mark.parametrize(("boxed", "expected"), WEMATH)
def test_wemath(records: dict[str, dict[str, QuestionRecord]], boxed: str, expected: float) -> None:
    check(records, "wemath", "2steps_1|2steps_multi", boxed, expected)


MMK12 = [
    # id 1: options A. 3 B. 4 C. 5 D. 6, answer C
    pytest.param("C", 1.0, id="letter"),
    pytest.param("C. 5", 1.0, id="letter-with-option-text"),
    pytest.param("\\text{(C)}", 1.0, id="text-wrapped-letter"),
    pytest.param("5", 1.0, id="option-text"),
    pytest.param("D", 0.0, id="wrong-letter"),
    pytest.param("6", 0.0, id="wrong-option-text"),
    pytest.param("G", 0.0, id="letter-outside-options"),
]


@pytest.mark.parametrize(("boxed", "expected"), MMK12)
def test_mmk12(records: dict[str, dict[str, QuestionRecord]], boxed: str, expected: float) -> None:
    check(records, "mmk12", "1", boxed, expected)


@pytest.mark.parametrize("name", list(WRITERS))
def test_every_scorer_reads_the_last_box_only(records: dict[str, dict[str, QuestionRecord]], name: str) -> None:
    """No box, an unclosed last box, or a right answer in an earlier box all score 0."""
    bench = get_benchmark(name)
    record = next(iter(records[name].values()))
    right = {"mathvista": "14", "mathverse": "14", "mathvision": "6", "olympiadbench": "0.5",
             "wemath": "B", "mmk12": "C"}[name]
    assert bench.score(record, box(right)) == 1.0
    assert bench.score(record, f"The answer is {right}.") == 0.0
    assert bench.score(record, f"\\boxed{{{right}}} no wait \\boxed{{999}}") == 0.0
    assert bench.score(record, f"\\boxed{{999}} no wait \\boxed{{{right}}}") == 1.0
    assert bench.score(record, f"\\boxed{{{right}}} then \\boxed{{{right}") == 0.0


def test_records_from_a_path_directory_are_independent_of_cwd(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_mathvista(tmp_path)
    monkeypatch.chdir("/")
    records, _ = get_benchmark("mathvista").read(path)
    assert all(Path(str(r.images[0])).is_file() for r in records)
