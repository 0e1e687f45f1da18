"""User rewards plugged in as `FunctionReward`, from Python and through the real CLI (issue 16 item 5)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diva_lightning.rewards import CombinedReward, FunctionReward, Reward, RewardBreakdown
from diva_lightning.system.module import DivaGRPOModule

REPO = Path(__file__).resolve().parents[2]
USER = "tests.rewards.user_rewards"
RESPONSES, ANSWERS = ["ab", "abc", "7", ""], ["7"] * 4


def test_both_shipped_rewards_are_rewards_and_the_system_takes_either() -> None:
    for reward in (CombinedReward(), FunctionReward(f"{USER}:even_length")):
        assert isinstance(reward, Reward)
        assert DivaGRPOModule(reward=reward).reward is reward


@pytest.mark.parametrize(("fn", "batched"), [(f"{USER}:even_length", True), (f"{USER}.even_length_numpy", True),
                                             (f"{USER}:has_digit", False)])
def test_batched_lists_arrays_and_per_sample_functions_give_a_breakdown(fn: str, batched: bool) -> None:
    out = FunctionReward(fn, batched=batched)(RESPONSES, ANSWERS, prompts=["Q"] * 4, question_ids=["q"] * 4)
    expected = [1.0, 0.0, 0.0, 1.0] if batched else [0.0, 0.0, 1.0, 0.0]  # even length / has a digit
    assert isinstance(out, RewardBreakdown) and out.reward.dtype == torch.float32
    assert out.reward.tolist() == out.accuracy.tolist() == expected  # a plain reward doubles as the accuracy
    assert out.format.tolist() == [0.0] * 4


def test_own_accuracy_threshold_and_keyword_filtering() -> None:
    shaped = FunctionReward(f"{USER}:shaped")(RESPONSES, ANSWERS)
    assert shaped.reward.tolist() == [0.5, 0.5, 1.0, 0.5] and shaped.accuracy.tolist() == [0, 0, 1, 0]
    signed = FunctionReward(f"{USER}:plus_minus", accuracy_threshold=0.0)(RESPONSES, ANSWERS)
    assert signed.reward.tolist() == [-1, -1, 1, -1] and signed.accuracy.tolist() == [0, 0, 1, 0]
    # a function naming only `prompts` gets prompts and not question_ids
    picky = FunctionReward(f"{USER}:sees_prompts")(RESPONSES, ANSWERS, prompts=["Q", "x", "Q", "x"], question_ids=[])
    assert picky.reward.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize(("fn", "kwargs", "error", "message"), [
    ("too_short", {}, ValueError, r"reward function tests.rewards.user_rewards:too_short returned reward of shape "
                                  r"\(3,\) \(3 values\) for 4 responses, expected \(4,\)"),
    ("with_nan", {}, ValueError, r"user_rewards:with_nan returned non-finite reward at positions \[0\]: \[nan\]"),
    ("words", {}, ValueError, r"user_rewards:words returned reward as list that is not a sequence of numbers"),
    ("per_sample_none", {"batched": False}, ValueError, r"per_sample_none returned NoneType None for one response"),
    ("plus_minus", {}, ValueError, r"plus_minus gave accuracies outside \[0, 1\] at positions \[0, 1, 3\] "
                                   r"\(\[-1.0, -1.0, -1.0\]\); the reward doubles as the accuracy: set "
                                   "accuracy_threshold"),
    ("has_digit", {}, ValueError, r"user_rewards:has_digit returned one number for 4 responses; a per-sample "
                                  "function"),
    ("even_length", {"batched": False}, ValueError, r"even_length returned list \[0.0, 0.0\] for one response, "
                                                    "expected a number; a batched function needs batched=true"),
    ("needs_question", {"batched": False}, TypeError, r"needs_question must accept \(response, answer\) with "
                                                     "batched=False: missing a required argument: 'question'"),
])
def test_bad_returns_and_signatures_are_clear_errors(fn: str, kwargs: dict[str, bool], error: type,
                                                     message: str) -> None:
    with pytest.raises(error, match=message):
        FunctionReward(f"{USER}:{fn}", **kwargs)(RESPONSES, ANSWERS)


def test_missing_function_and_bad_arguments_are_refused_at_construction() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        FunctionReward(f"{USER}:nope")
    with pytest.raises(ValueError, match="num_workers applies to per-sample"):
        FunctionReward(f"{USER}:even_length", num_workers=2)


@pytest.mark.slow
@pytest.mark.parametrize(("fn", "batched"), [("even_length", "true"), ("has_digit", "false")])
def test_a_users_reward_trains_through_the_real_cli(tiny_policy_dir: str, tmp_path: Path, fn: str,
                                                    batched: str) -> None:
    log = tmp_path / "graded.jsonl"
    args = [sys.executable, "-m", "diva_lightning", "fit", "--config", str(REPO / "experiments/full.yaml"),
            "--model.init_args.policy", tiny_policy_dir, "--build_base_policy", "false",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.logger.init_args.version", "0",
            "--data.init_args.questions_per_step", "2", "--data.init_args.world.train_size", "8",
            "--model.init_args.num_generations", "3", "--model.init_args.train_sampling.max_new_tokens", "8",
            "--model.init_args.reward.class_path", "diva_lightning.rewards.FunctionReward",
            "--model.init_args.reward.init_args.fn", f"{USER}:{fn}",
            "--model.init_args.reward.init_args.batched", batched]
    done = subprocess.run(args, cwd=REPO, env=dict(os.environ, USER_REWARD_LOG=str(log), OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    per_step = 2 * 2 * 3  # B questions x (original + V variant) x G responses
    assert len(calls) == (2 if batched == "true" else 2 * per_step)
    rewards = [r for c in calls for r in c["rewards"]]
    steps = [rewards[:per_step], rewards[per_step:]]
    with open(tmp_path / "full" / "version_0" / "metrics.csv") as f:
        logged = [float(row["reward"]) for row in csv.DictReader(f) if row.get("reward")]
    assert logged == pytest.approx([sum(s) / per_step for s in steps])  # the run optimised the user's reward
    config = (tmp_path / "full" / "version_0" / "config.yaml").read_text()
    assert "class_path: diva_lightning.rewards.FunctionReward" in config and f"{USER}:{fn}" in config
