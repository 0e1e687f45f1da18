"""format_reward: exact acceptance rules of the think-then-boxed format."""

from __future__ import annotations

import pytest

from diva_lightning.rewards import format_reward


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (r"<think>count the dots</think> The answer is \boxed{3}.", 1.0),
        ("\n  <think>\nmulti\nline\n</think>\n\\boxed{\\frac{1}{2}}", 1.0),
        (r"<think>x</think>\boxed{3} and some trailing text", 1.0),
        (r"<think>   </think> \boxed{3}", 0.0),  # empty reasoning
        (r"<think>reasoning</think> the answer is 3", 0.0),  # no box
        (r"<think>reasoning</think> \boxed{}", 0.0),  # empty box
        (r"<think>reasoning</think> \boxed{3", 0.0),  # unclosed box
        (r"<think>reasoning \boxed{3}</think> done", 0.0),  # box only inside the think block
        (r"preamble <think>reasoning</think> \boxed{3}", 0.0),  # think block not first
        (r"<think>a</think><think>b</think> \boxed{3}", 0.0),  # second think block
        (r"<think>a <think> b</think> \boxed{3}", 0.0),  # nested opener
        (r"<think>reasoning \boxed{3}", 0.0),  # never closed
        (r"\boxed{3}", 0.0),  # no think block at all
        (r"<THINK>r</THINK> \boxed{3}", 0.0),  # tags are case-sensitive
    ],
)
def test_format_rules(response: str, expected: float) -> None:
    assert format_reward(response) == expected


def test_long_response() -> None:
    # 120k characters: the pattern scans each character once (no nested quantifiers to backtrack over)
    assert format_reward("<think>" + "step. " * 20000 + "</think> \\boxed{3}") == 1.0
    assert format_reward("<think>" + "step. " * 20000 + "</think> \\boxed{3") == 0.0
