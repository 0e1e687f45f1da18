"""AdvantageMonitor takes what its contract says, like DifficultyCallback, or refuses with a message (issue 16.6).

The same step given as 1-D tensors, plain lists, numpy arrays, 2-D [P, G] tensors and string group labels must give
exactly the same metrics; a 3-D tensor, text rewards or a key of another length is a named error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diva_lightning.callbacks.advantage_monitor import monitor_metrics
from diva_lightning.callbacks.difficulty import stats_from_outputs

# Two prompts x 3 responses; prompt 0 has spread, prompt 1 does not.
REWARDS = [[1.0, 0.0, 1.0], [0.1, 0.1, 0.1]]
BASE = {
    "rewards": torch.tensor(REWARDS).flatten(),
    "prompt_ids": torch.tensor([0, 0, 0, 1, 1, 1]),
    "family_ids": torch.tensor([0, 0, 0, 0, 0, 0]),
    "is_original": torch.tensor([True, True, True, False, False, False]),
    "accuracy": torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
    "kind": torch.tensor([0, 0, 0, 3, 3, 3]),
    "tier": torch.tensor([1, 1, 1, 1, 1, 1]),
    "advantages": torch.tensor([0.5, -1.0, 0.5, 0.0, 0.0, 0.0]),
    "completion_lengths": torch.tensor([4, 6, 8, 2, 2, 2]),
}


def test_hand_worked_metrics_of_the_reference_step() -> None:
    m = monitor_metrics(dict(BASE))
    assert m["reward"] == pytest.approx(2.3 / 6)
    assert m["frac_reward_zero_std"] == 0.5  # prompt 1 is all 0.1
    assert m["frac_family_zero_std"] == 0.0
    assert "variant_rescue_rate" not in m  # the original group has spread: nothing to rescue
    assert m["frac_zero_advantage"] == pytest.approx(3 / 6)
    assert m["completions/mean_length"] == pytest.approx(24 / 6)


@pytest.mark.parametrize("form", ["lists", "numpy", "2d", "string_ids", "2d_without_prompt_ids"])
def test_lists_arrays_2d_and_labels_give_the_same_metrics(form: str) -> None:
    out: dict[str, object] = dict(BASE)
    if form == "lists":
        out = {k: v.tolist() for k, v in BASE.items()}
    elif form == "numpy":
        out = {k: v.numpy() for k, v in BASE.items()}
    elif form in ("2d", "2d_without_prompt_ids"):
        out = {k: v.reshape(2, 3) for k, v in BASE.items()}  # [P, G], flattened row-major
        if form == "2d_without_prompt_ids":
            del out["prompt_ids"]  # the rows are the prompts
    elif form == "string_ids":
        out["prompt_ids"] = ["q7/orig"] * 3 + ["q7/hint"] * 3
        out["family_ids"] = ["q7"] * 6
    assert monitor_metrics(out) == monitor_metrics(dict(BASE))


def test_the_difficulty_callback_reads_the_same_forms() -> None:
    ids = ["a", "a", "a", "b", "b", "b"]
    for accuracy in (BASE["accuracy"], BASE["accuracy"].tolist(), BASE["accuracy"].reshape(2, 3)):
        stats = stats_from_outputs({"question_ids": ids, "accuracy": accuracy})
        assert stats is not None and stats.correct.tolist() == [2.0, 0.0]
        monitor_metrics({"rewards": accuracy, "prompt_ids": ids})  # and the monitor accepts them too


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"rewards": torch.zeros(2, 3, 1)}, ValueError, r"outputs\['rewards'\] must be 1-D \[N\] or 2-D \[P, G\], "
                                                    r"got shape \(2, 3, 1\)"),
    ({"rewards": ["good"] * 6}, TypeError, r"outputs\['rewards'\] must be a tensor, list or array of numbers, "
                                           "got list"),
    ({"accuracy": torch.zeros(5)}, ValueError, r"outputs\['accuracy'\] has 5 entries but outputs\['rewards'\] has 6: "
                                               "every key holds one entry per response"),
    ({"kind": {"a": 1}}, TypeError, r"outputs\['kind'\] must be a tensor, list or array of numbers, got dict"),
    ({"prompt_ids": None}, TypeError, r"outputs\['prompt_ids'\] must be a tensor, list or array of numbers"),
])
def test_what_the_contract_does_not_allow_is_a_named_error(change: dict[str, object], error: type,
                                                           message: str) -> None:
    with pytest.raises(error, match=message):
        monitor_metrics({**BASE, **change})
    with pytest.raises(KeyError, match="lack required key 'prompt_ids' \\(needed unless 'rewards' is 2-D"):
        monitor_metrics({"rewards": np.zeros(6)})
