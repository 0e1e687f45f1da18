"""A user's reward module, written the way README "Plug in a reward" tells users to (imported by import path).

Each function appends what it graded and what it returned to the JSONL file named by $USER_REWARD_LOG (when
set), so a test can check that the run used exactly these values.
"""

from __future__ import annotations

import json
import os

import numpy as np


def _log(kind: str, responses: list[str], rewards: list[float]) -> None:
    path = os.environ.get("USER_REWARD_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "responses": responses, "rewards": rewards}) + "\n")


def even_length(responses: list[str], answers: list[str]) -> list[float]:
    """Batched, returns a plain list (the case that used to crash): 1.0 for an even number of characters."""
    rewards = [float(len(r) % 2 == 0) for r in responses]
    _log("batched", responses, rewards)
    return rewards


def even_length_numpy(responses: list[str], answers: list[str], **kwargs: object) -> np.ndarray:
    return np.array([float(len(r) % 2 == 0) for r in responses])


def shaped(responses: list[str], answers: list[str]) -> dict[str, list[float]]:
    """Batched with its own accuracy: reward 0.5 + 0.5 * correct."""
    correct = [float(r.strip() == a) for r, a in zip(responses, answers)]
    return {"reward": [0.5 + 0.5 * c for c in correct], "accuracy": correct}


def has_digit(response: str, answer: str) -> float:
    """Per sample: 1.0 when the response contains a digit."""
    reward = float(any(ch.isdigit() for ch in response))
    _log("per_sample", [response], [reward])
    return reward


def plus_minus(responses: list[str], answers: list[str]) -> list[float]:
    """Batched on a -1 / +1 scale (needs accuracy_threshold)."""
    return [1.0 if r == a else -1.0 for r, a in zip(responses, answers)]


def too_short(responses: list[str], answers: list[str]) -> list[float]:
    return [1.0] * (len(responses) - 1)


def with_nan(responses: list[str], answers: list[str]) -> list[float]:
    return [float("nan")] + [0.0] * (len(responses) - 1)


def words(responses: list[str], answers: list[str]) -> list[str]:
    return ["good"] * len(responses)


def per_sample_none(response: str, answer: str) -> None:
    return None


def sees_prompts(responses: list[str], answers: list[str], prompts: tuple[str, ...] = ()) -> list[float]:
    """Takes one optional keyword argument: gets `prompts` and nothing else."""
    return [float(p.startswith("Q")) for p in prompts]


def needs_question(response: str, answer: str, question: str) -> float:
    """A third required argument: neither contract can call it."""
    return 0.0
