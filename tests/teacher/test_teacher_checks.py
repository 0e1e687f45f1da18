"""Each check with a passing and a failing case; the similarity measure by hand."""

from __future__ import annotations

import pytest

from diva_lightning.teacher.checks import (
    answer_mentions,
    check_paraphrase,
    check_steps,
    edit_distance,
    similarity,
    states_answer,
)

PROBLEM = "How many red shapes are in <image>?"


def test_similarity_by_hand() -> None:
    # words: how many red shapes are in <image> (7) vs + "there" (8): one insertion -> 1 - 1/8
    assert similarity(PROBLEM, "How many red shapes are there in <image>?") == pytest.approx(0.875)
    # count the red shapes in <image> (6) vs 7: how->count, many->the, drop "are" -> 1 - 3/7
    assert similarity(PROBLEM, "Count the red shapes in <image>.") == pytest.approx(4 / 7)
    assert similarity(PROBLEM, PROBLEM.upper()) == 1.0  # case and punctuation do not count
    assert similarity("", "") == 1.0 and similarity("a b", "") == 0.0
    assert edit_distance(list("kitten"), list("sitting")) == 3


def test_paraphrase_passes_all_checks() -> None:
    assert check_paraphrase("Count the red shapes in <image>.", PROBLEM, "3", []) is None


def test_paraphrase_image_tags() -> None:
    assert check_paraphrase("Count the red shapes in the picture.", PROBLEM, "3", []) == "image_tags"
    assert check_paraphrase("Count the red shapes in <image> and <image>.", PROBLEM, "3", []) == "image_tags"


def test_paraphrase_contains_answer() -> None:
    assert check_paraphrase("There are 3 red shapes in <image>; how many?", PROBLEM, "3", []) == "contains_answer"
    assert check_paraphrase("Count the red shapes in <image>. \\boxed{}", PROBLEM, "3", []) == "contains_answer"
    # the problem's own data may repeat: "add 3" with answer 3 is one mention on both sides
    plus = "How many red shapes are in <image>? Add 3 to that number."
    assert check_paraphrase("Count the red shapes in <image>, then add 3.", plus, "3", []) is None
    assert check_paraphrase("Count the red shapes in <image> (it is 3), then add 3.", plus, "3", []) \
        == "contains_answer"


def test_answer_mentions_by_answer_kind() -> None:
    # numbers: not inside a longer number or a decimal
    assert answer_mentions("13 shapes, 3.5 cm, 3 left, ends with 3.", "3") == 2
    # choice letters: not option labels, not the article
    options = "Are there more red or blue shapes in <image>? (A) red (B) blue (C) equal"
    assert answer_mentions(options, "A") == 0
    assert answer_mentions("A red shape is here; the answer is A.", "A") == 1
    # words: whole words, any case
    assert answer_mentions("Yes, the yesterday answer is YES", "yes") == 2


def test_paraphrase_near_copy_and_duplicate() -> None:
    assert check_paraphrase("How many red shapes are there in <image>?", PROBLEM, "3", []) == "near_copy"
    kept = ["Count the red shapes in <image>."]
    assert check_paraphrase("Count all the red shapes in <image>.", PROBLEM, "3", kept) == "duplicate"
    assert check_paraphrase("Count all the red shapes in <image>.", PROBLEM, "3", kept, max_similarity=0.9) is None


GOOD_STEPS = ["red squares: 1. Total 1.", "red circles: 2. Total 3.", "red triangles: 1."]
GOOD_REPLY = "".join(f"<step{i}>{s}</step{i}>" for i, s in enumerate(GOOD_STEPS, 1)) + " \\boxed{4}"


def test_steps_pass() -> None:
    # "Total 3." in step 2 is an intermediate value, not the answer 4; the last step ends with "1"
    assert check_steps(GOOD_REPLY, GOOD_STEPS, "4") is None


def test_steps_answer_must_be_boxed_and_correct() -> None:
    assert check_steps(GOOD_REPLY.replace("\\boxed{4}", "4"), GOOD_STEPS, "4") == "no_answer"
    assert check_steps(GOOD_REPLY, GOOD_STEPS, "5") == "wrong_answer"
    assert check_steps(GOOD_REPLY.replace("{4}", "{4.0}"), GOOD_STEPS, "4") is None  # graded, not compared


def test_steps_structure_and_count() -> None:
    assert check_steps(GOOD_REPLY, None, "4") == "malformed_steps"
    assert check_steps(GOOD_REPLY, GOOD_STEPS[:2], "4") == "step_count"
    assert check_steps(GOOD_REPLY, GOOD_STEPS * 2, "4") == "step_count"
    assert check_steps(GOOD_REPLY, GOOD_STEPS[:2], "4", min_steps=2) is None


def test_steps_must_not_state_the_answer() -> None:
    assert check_steps(GOOD_REPLY, [*GOOD_STEPS[:2], "red triangles: 1. Total 4."], "4") == "states_answer"
    assert states_answer(["a", "b", "So the answer is (B), done."], "B")
    assert states_answer(["a", "we get \\boxed{B}", "c"], "B")
    assert states_answer(["a", "b", "Half of it: $\\frac{1}{2}$."], "0.5")  # graded, so 1/2 == 0.5
    assert not states_answer(["a", "b", "Compare the counts: 2 > 1."], "A")
    assert not states_answer(["A red square is first.", "b", "c"], "A")
