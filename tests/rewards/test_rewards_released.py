r"""The released reward (rewards/released.py) against the real mathruler: the project's held-out accuracy table and
format table (math-verify style) plus mathruler-style answers, each with the expected grade written out, and a
check that every case grades exactly as mathruler's own ``grade_answer(extract_boxed_content(...))`` does."""

from __future__ import annotations

import pytest
import torch
from mathruler.grader import extract_boxed_content, grade_answer

from diva_lightning.rewards.released import ReleasedReward, released_accuracy, released_format, released_text
from tests.rewards.test_rewards_accuracy import CASES, box

# Where mathruler's verdict differs from the project's math-verify table (measured; rewards/released.py docs).
MATHRULER_DIFFERS = {"letter-period", "letter-with-option-text", "percent-vs-decimal", "decimal-vs-percent",
                     "set-order", "phrase-wrapped"}

# mathruler-style answers (MATH/EasyR1 conventions), hand-graded: (boxed prediction, gold, expected)
MATHRULER_CASES = [
    pytest.param(r"\dfrac{3}{4}", r"\frac{3}{4}", 1.0, id="dfrac"),
    pytest.param("3/4", r"\frac{3}{4}", 1.0, id="slash-fraction"),
    pytest.param(r"\frac{6}{8}", r"\frac{3}{4}", 0.0, id="unreduced-fraction"),
    pytest.param(r"2\sqrt{3}", r"\sqrt{12}", 1.0, id="sqrt-simplified-by-sympy"),
    pytest.param("(1, 2)", "(1,2)", 1.0, id="tuple-spaces"),
    pytest.param("(2, 1)", "(1,2)", 0.0, id="tuple-order"),
    pytest.param("[1, 2)", "(1,2)", 0.0, id="interval-brackets"),
    pytest.param("1,000", "1000", 1.0, id="thousands-comma"),
    pytest.param(r"\text{B}", "B", 1.0, id="text-letter"),
    pytest.param(r"5\text{ meters}", "5", 1.0, id="unit-word-dropped"),
    pytest.param("x^2+2x+1", "(x+1)^2", 1.0, id="expanded-polynomial"),
    pytest.param("0.333", r"\frac{1}{3}", 0.0, id="rounded-decimal"),
]


@pytest.mark.parametrize(("pred", "gold", "expected"), CASES)
def test_project_table_grades_as_mathruler(pred: str, gold: str, expected: float, request: pytest.FixtureRequest
                                           ) -> None:
    response = box(pred)
    mine = released_accuracy(response, gold)
    assert mine == float(grade_answer(extract_boxed_content(response), gold))
    case = request.node.callspec.id
    assert mine == (1.0 - expected if case in MATHRULER_DIFFERS else expected), case


@pytest.mark.parametrize(("pred", "gold", "expected"), MATHRULER_CASES)
def test_mathruler_style_answers(pred: str, gold: str, expected: float) -> None:
    response = box(pred)
    assert released_accuracy(response, gold) == expected == float(grade_answer(extract_boxed_content(response), gold))


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"<think>count the dots</think> The answer is \boxed{3}.", 1.0),
        (r"<think>   </think> \boxed{3}", 1.0),  # empty reasoning: accepted as released
        (r"<think>reasoning</think> the answer is 3", 0.0),  # no box
        (r"<think>reasoning</think> \boxed{}", 1.0),  # empty box
        (r"<think>reasoning</think> \boxed{3", 0.0),  # unclosed: the pattern needs a closing brace after \boxed{
        (r"<think>reasoning</think> \boxed{3 and later }", 1.0),
        (r"<think>reasoning \boxed{3}</think> done", 0.0),  # the box must follow </think>
        (r"preamble <think>reasoning</think> \boxed{3}", 0.0),  # think block not first
        (r"<think>a</think><think>b</think> \boxed{3}", 1.0),  # second think block
        ("< think >r< / think > \\boxed{3}", 1.0),  # spaces around < > / are removed first (math.py:38)
        ("<think>r</think>\n\n\\boxed{3}\n", 1.0),  # DOTALL
        (r"<THINK>r</THINK> \boxed{3}", 0.0),  # case-sensitive
        (r"\boxed{3}", 0.0),
    ],
)
def test_released_format(response: str, expected: float) -> None:
    assert released_format(response) == expected


def test_normalisation_reaches_the_answer_too() -> None:
    # math.py:38 rewrites the whole response, so "1 / 2" in a box is graded as "1/2"
    assert released_text("a < b / c > d") == "a<b/c>d"
    assert released_accuracy(r"<think>x</think> \boxed{1 / 2}", r"\frac{1}{2}") == 1.0
    assert released_accuracy(r"<think>x</think> no box", "None") == 1.0  # mathruler reads no box as "None"


def test_reward_is_point_nine_accuracy_plus_point_one_format() -> None:
    reward = ReleasedReward()
    out = reward([r"<think>a</think> \boxed{3}", r"\boxed{3}", r"<think>a</think> \boxed{4}", "3"],
                 ["3", "3", "3", "3"])
    assert torch.allclose(out.reward, torch.tensor([1.0, 0.9, 0.1, 0.0]))
    assert out.accuracy.tolist() == [1.0, 1.0, 0.0, 0.0] and out.format.tolist() == [1.0, 0.0, 1.0, 0.0]
    threaded = ReleasedReward(num_workers=2)([r"<think>a</think> \boxed{3}"] * 4, ["3", "4", "3", "4"])
    assert threaded.accuracy.tolist() == [1.0, 0.0, 1.0, 0.0]
