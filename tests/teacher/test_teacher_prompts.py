"""The teacher prompts: what each one asks for, and that only turn 2 knows the answer."""

from __future__ import annotations

import pytest

from diva_lightning.teacher.prompts import (
    PROMPT_VERSION,
    paraphrase_prompt,
    revise_prompt,
    solve_prompt,
    steps_prompt,
)

PROBLEM = "How many red shapes are in <image>?"


def test_paraphrase_prompt_asks_for_k_tagged_variants_keeping_the_image_tag() -> None:
    text = paraphrase_prompt(PROBLEM, 3)
    assert text.startswith("Write 3 distinct rewordings")
    assert "<variant1> ... </variant1> up to <variant3> ... </variant3>" in text
    assert "contain the tag <image> once" in text
    assert text.endswith(f"Problem: {PROBLEM}")  # the problem is quoted verbatim, last


def test_paraphrase_prompt_image_rule_follows_the_problem() -> None:
    assert "contain no <image> tag" in paraphrase_prompt("What is 2 + 3?", 5)
    assert "contain the tag <image> exactly 2 times" in paraphrase_prompt("Compare <image> and <image>.", 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        paraphrase_prompt(PROBLEM, 0)


def test_two_turn_steps_prompts_only_the_second_turn_knows_the_answer() -> None:
    first = steps_prompt(PROBLEM, min_steps=3, max_steps=5)
    second = revise_prompt("7", min_steps=3, max_steps=5)
    assert "3 to 5 short reasoning steps" in first and "<step1> ... </step1>" in first and "\\boxed{}" in first
    assert first.endswith(f"Problem: {PROBLEM}")
    assert "7" not in first
    assert second.startswith("The correct answer to this question is: 7\n")
    assert "must not state the final answer and must not reason backwards from it" in second
    assert "3 to 5 steps" in second and "\\boxed{}" in second


def test_solve_prompt_and_version() -> None:
    assert solve_prompt(PROBLEM) == f"{PROBLEM}\n\nSolve the problem and give the final answer in \\boxed{{}}."
    assert PROMPT_VERSION == "diva-teacher-v1"  # bump it when any wording above changes
