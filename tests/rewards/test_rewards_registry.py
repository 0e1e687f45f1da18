"""CombinedReward, the reward-function contract and load_reward_fn (real graders, no mocks)."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diva_lightning.rewards import (
    CombinedReward,
    RewardBreakdown,
    RewardFunction,
    accuracy_reward,
    as_breakdown,
    format_reward,
    load_reward_fn,
)

RESPONSES = [
    r"<think>two and one</think> \boxed{3}",  # right, well formed
    r"The answer is \boxed{3}",  # right, no think block
    r"<think>guess</think> \boxed{4}",  # wrong, well formed
    r"<think>hmm</think> no idea",  # no answer
]
ANSWERS = ["3", "3", "3", "3"]


def test_combined_reward_hand_worked() -> None:
    out = CombinedReward(acc_weight=0.9, format_weight=0.1).compute(RESPONSES, ANSWERS)
    assert out.accuracy.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.format.tolist() == [1.0, 0.0, 1.0, 0.0]
    # 0.9 * acc + 0.1 * fmt
    torch.testing.assert_close(out.reward, torch.tensor([1.0, 0.9, 0.1, 0.0]))
    assert out.reward.dtype == torch.float32 and len(out) == 4


def test_combined_reward_equals_per_sample_functions_and_thread_pool() -> None:
    responses = RESPONSES * 6
    answers = ["3", "4", "B", r"\frac{1}{2}"] * 6
    serial = CombinedReward().compute(responses, answers)
    pooled = CombinedReward(num_workers=3).compute(responses, answers)
    ref_acc = [accuracy_reward(r, a) for r, a in zip(responses, answers)]
    ref_fmt = [format_reward(r) for r in responses]
    for out in (serial, pooled):
        assert out.accuracy.tolist() == ref_acc
        assert out.format.tolist() == ref_fmt


def test_combined_reward_is_a_reward_function() -> None:
    fn = CombinedReward()
    assert isinstance(fn, RewardFunction)
    out = as_breakdown(fn(RESPONSES, ANSWERS, prompts=["p"] * 4), 4)
    assert out.accuracy.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_combined_reward_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="weights"):
        CombinedReward(acc_weight=-1.0)
    with pytest.raises(ValueError, match="num_workers"):
        CombinedReward(num_workers=-1)
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        CombinedReward().compute(["a", "b"], ["a"])


def test_as_breakdown_plain_list_is_reward_and_accuracy() -> None:
    out = as_breakdown([1.0, 0.0, 0.5], 3)
    assert out.reward.tolist() == out.accuracy.tolist() == [1.0, 0.0, 0.5]
    assert out.format.tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        as_breakdown([1.0, 0.0], 3)
    with pytest.raises(ValueError, match="non-finite"):
        as_breakdown([float("nan")], 1)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A user's reward module on sys.path, written the way the module docstring tells users to."""
    pkg = tmp_path / "my_rewards_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scoring.py").write_text(textwrap.dedent('''
        def length_bonus(responses, answers, **kwargs):
            return [min(len(r), 10) / 10 for r in responses]

        def exact(response, answer):
            return float(response.strip() == answer)

        class Stateful:
            def __init__(self):
                self.calls = 0

            def __call__(self, responses, answers, **kwargs):
                self.calls += 1
                return [float(self.calls)] * len(responses)

        class Holder:
            nested = staticmethod(length_bonus)

        NOT_CALLABLE = 3

        def wrong_arity(responses):
            return []
    '''))
    (pkg / "broken.py").write_text("import a_dependency_that_is_not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_pkg"
    for name in [m for m in sys.modules if m.startswith("my_rewards_pkg")]:
        del sys.modules[name]


def test_load_reward_fn_resolves_user_functions(user_module: str) -> None:
    fn = load_reward_fn(f"{user_module}.scoring:length_bonus")
    assert fn(["abcde", "x" * 30], ["", ""]) == [0.5, 1.0]
    nested = load_reward_fn(f"{user_module}.scoring:Holder.nested")
    assert nested(["abcde"], [""]) == [0.5]
    stateful = load_reward_fn(f"{user_module}.scoring:Stateful")  # class -> instance
    assert stateful(["a"], ["a"]) == [1.0] and stateful(["a"], ["a"]) == [2.0]


def test_per_sample_user_function_plugs_into_combined_reward(user_module: str) -> None:
    out = CombinedReward(accuracy_fn=f"{user_module}.scoring:exact").compute(["3", " 3 ", "4"], ["3"] * 3)
    assert out.accuracy.tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize(
    ("path", "error", "message"),
    [
        ("no_colon_here", ValueError, "package.module:function"),
        (":fn", ValueError, "package.module:function"),
        ("my_rewards_pkg.missing_module:fn", ImportError, "no module named 'my_rewards_pkg.missing_module'"),
        ("my_rewards_pkg.broken:fn", ImportError, "failed to import"),
        ("my_rewards_pkg.scoring:nope", AttributeError, "has no attribute 'nope'.*length_bonus"),
        ("my_rewards_pkg.scoring:NOT_CALLABLE", TypeError, "non-callable int"),
        ("my_rewards_pkg.scoring:wrong_arity", TypeError, r"must accept \(responses, answers"),
    ],
)
def test_load_reward_fn_errors_are_clear(user_module: str, path: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        load_reward_fn(path)


def test_breakdown_is_frozen() -> None:
    out = RewardBreakdown(torch.zeros(1), torch.zeros(1), torch.zeros(1))
    with pytest.raises(AttributeError):
        out.reward = torch.ones(1)  # type: ignore[misc]
