"""accuracy_reward against real math-verify: a table of must-grade cases, box extraction, thread safety."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from diva_lightning.rewards import accuracy_reward, choice_letter, last_boxed
from diva_lightning.rewards.accuracy import MAX_ANSWER_CHARS


def box(s: str) -> str:
    return f"<think>work</think> The answer is \\boxed{{{s}}}."


CASES = [
    # (boxed prediction, gold answer, expected)  -- the reason in the id
    pytest.param(r"\frac{1}{2}", "0.5", 1.0, id="fraction-vs-decimal"),
    pytest.param("0.5", r"\frac{1}{2}", 1.0, id="decimal-vs-fraction"),
    pytest.param(r"\frac{1}{3}", "0.5", 0.0, id="wrong-fraction"),
    pytest.param("(B)", "B", 1.0, id="paren-letter"),
    pytest.param("B", "(B)", 1.0, id="gold-paren-letter"),
    pytest.param("B.", "B", 1.0, id="letter-period"),
    pytest.param("(b)", "B", 1.0, id="lowercase-letter"),
    pytest.param(r"\text{(B)}", "B", 1.0, id="text-wrapped-letter"),
    pytest.param(r"\textbf{C}", "C", 1.0, id="bold-letter"),
    pytest.param("(C) 15", "C", 1.0, id="letter-with-option-text"),
    pytest.param("(A)", "B", 0.0, id="wrong-letter"),
    pytest.param("15", "C", 0.0, id="number-for-choice"),
    pytest.param(r"45^\circ", "45", 1.0, id="degrees-pred"),
    pytest.param("45", r"45^\circ", 1.0, id="degrees-gold"),
    pytest.param(r"50\%", "0.5", 1.0, id="percent-vs-decimal"),
    pytest.param("0.5", r"50\%", 1.0, id="decimal-vs-percent"),
    pytest.param(r"6\text{ cm}", "6", 1.0, id="units-in-text"),
    pytest.param(r"7\text{ cm}", "6", 0.0, id="wrong-with-units"),
    pytest.param(r"\{2,1\}", r"\{1,2\}", 1.0, id="set-order"),
    pytest.param(r"\{1,3\}", r"\{1,2\}", 0.0, id="wrong-set"),
    pytest.param("x=3", "3", 1.0, id="equation-vs-value"),
    pytest.param("3", "x=3", 1.0, id="value-vs-equation"),
    pytest.param("3", "4", 0.0, id="wrong-number"),
    pytest.param("12.0", "12", 1.0, id="trailing-zero"),
    pytest.param(r"\sqrt{2}", r"\sqrt{2}", 1.0, id="same-expression"),
    pytest.param("1+x^2", "x^2+1", 1.0, id="commuted-polynomial"),
    pytest.param(r"\frac{\sqrt{3}}{2}", r"\frac{\sqrt{3}}{2}", 1.0, id="nested-braces"),
    pytest.param(r"\infty", r"\infty", 1.0, id="infinity"),
    pytest.param("Yes", "yes", 1.0, id="word-case"),
    pytest.param(r"\text{Right triangle.}", "right triangle", 1.0, id="phrase-wrapped"),
    pytest.param("sey", "yes", 0.0, id="anagram-is-not-the-word"),
    pytest.param("no", "yes", 0.0, id="wrong-word"),
    pytest.param("", "3", 0.0, id="empty-box"),
    pytest.param("3", "", 0.0, id="empty-gold"),
    pytest.param("3", "   ", 0.0, id="blank-gold"),
    pytest.param(r"9^{9^{9^{9}}}", "3", 0.0, id="power-tower-guarded"),
    pytest.param(r"(10^{100})!", "3", 0.0, id="huge-factorial-guarded"),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), CASES)
def test_grading_table(pred: str, gold: str, expected: float) -> None:
    assert accuracy_reward(box(pred), gold) == expected


def test_last_box_wins() -> None:
    response = r"First I thought \boxed{4}, but rechecking: \boxed{3}."
    assert accuracy_reward(response, "3") == 1.0
    assert accuracy_reward(response, "4") == 0.0


def test_no_box_or_unclosed_last_box_scores_zero() -> None:
    assert accuracy_reward("The answer is 3.", "3") == 0.0
    # the last box is truncated: no answer, no fallback to the earlier box
    assert accuracy_reward(r"\boxed{3} then \boxed{3", "3") == 0.0


@pytest.mark.parametrize(
    ("text", "content"),
    [
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"a \boxed{1} b \boxed{\{1,2\}} c", r"\{1,2\}"),  # escaped braces do not unbalance
        (r"\boxed {42}", "42"),
        (r"\boxed{a{b}c}", "a{b}c"),
        (r"no box", None),
        (r"\boxed{unclosed {x}", None),
    ],
)
def test_last_boxed_extraction(text: str, content: str | None) -> None:
    assert last_boxed(text) == content


def test_choice_letter_gold_is_strict() -> None:
    assert choice_letter("(D)", gold=True) == "D"
    # a lower-case gold answer is a variable, not an option; option text is not a gold key
    assert choice_letter("x", gold=True) is None
    assert choice_letter("(C) 15", gold=True) is None
    assert choice_letter("(C) 15") == "C"


def test_overlong_answer_is_rejected_without_parsing() -> None:
    # a correct sum of ones: it would verify if it were parsed, so 0.0 proves the cap skipped parsing
    n_short, n_long = 10, MAX_ANSWER_CHARS // 2 + 1
    assert accuracy_reward(box("+".join(["1"] * n_short)), str(n_short)) == 1.0
    assert accuracy_reward(box("+".join(["1"] * n_long)), str(n_long)) == 0.0


def test_grading_from_thread_pool_matches_main_thread() -> None:
    # math-verify's signal timeouts would raise here ("signal only works in main thread"); ours must not.
    cases = [(box(p), g) for p, g, _ in (c.values for c in CASES[:20])]
    expected = [accuracy_reward(r, g) for r, g in cases]
    seen_threads: set[str] = set()

    def grade(pair: tuple[str, str]) -> float:
        seen_threads.add(threading.current_thread().name)
        return accuracy_reward(*pair)

    with ThreadPoolExecutor(max_workers=4) as pool:
        got = list(pool.map(grade, cases))
    assert got == expected
    assert threading.main_thread().name not in seen_threads


@pytest.mark.parametrize(("boxed", "gold", "expected"), [
    ("B or A", "B", 0.0), ("B and C", "B", 0.0), ("B, C", "B", 0.0), ("(B)(C)", "B", 0.0), ("b/c", "B", 0.0),
    ("(C) 15 or (B) 20", "B", 0.0), ("b or c", "B", 0.0), ("B \\text{ or } C", "B", 0.0),
    ("B or b", "B", 1.0), ("(B) 15", "B", 1.0), ("B. 30°", "B", 1.0), ("(B) x+y", "B", 1.0), ("(b)", "B", 1.0),
    ("3 or 4", "3", 0.0), ("x = 3, x = 4", "3", 0.0), ("3 \\lor 4", "3", 0.0), ("yes or no", "yes", 0.0),
    # a capital in the option text is a point, an angle or a unit, not a second choice (review of issue 22)
    ("(B) Point P", "B", 1.0), ("B. 3 N", "B", 1.0), ("(B) \\angle A", "B", 1.0), ("A. 5 V", "A", 1.0),
    ("(D) 2 A", "D", 1.0),
])
def test_a_hedged_answer_scores_zero(boxed: str, gold: str, expected: float) -> None:
    """Issue 22: listing two letters used to collect the reward of each (a reward-hacking hole in RL)."""
    assert accuracy_reward(f"<think>r</think> \\boxed{{{boxed}}}", gold) == expected
