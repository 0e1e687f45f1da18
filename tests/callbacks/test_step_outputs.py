"""`StepOutputs`: the typed contract a training step hands the callbacks, read from a foreign module's plain dict."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from diva_lightning.callbacks.advantage_monitor import monitor_metrics
from diva_lightning.callbacks.difficulty import stats_from_outputs
from diva_lightning.callbacks.outputs import StepOutputs, batch_outputs
from diva_lightning.core.choices import STEP_KINDS, TIERS
from diva_lightning.data.batch import KIND_CODES, TIER_CODES

PLAIN = {"loss": torch.tensor(0.5), "rewards": torch.tensor([1.0, 0.1, 1.0, 1.0]), "question_ids": ["a", "a", "b", "b"],
         "accuracy": torch.tensor([1.0, 0.0, 1.0, 1.0]), "prompt_ids": torch.tensor([0, 0, 1, 1]), "note": "mine"}


def test_a_plain_dict_reads_as_typed_fields_and_round_trips() -> None:
    out = StepOutputs.from_mapping(PLAIN)
    assert out.question_ids == ["a", "a", "b", "b"] and out.loss is PLAIN["loss"]
    assert out.extra == {"note": "mine"}  # keys outside the contract are kept, not dropped
    assert out.has("rewards") and not out.has("family_ids")
    assert out.as_dict() == PLAIN  # what the module would return is what the foreign module returned


def test_a_key_given_as_none_is_given() -> None:
    out = StepOutputs.from_mapping({"rewards": [0.0, 1.0], "prompt_ids": None})
    assert out.has("prompt_ids") and out.as_dict() == {"rewards": [0.0, 1.0], "prompt_ids": None}
    with pytest.raises(TypeError, match=r"outputs\['prompt_ids'\] must be a tensor"):
        monitor_metrics(out)


def test_callbacks_read_the_dict_and_the_typed_outputs_alike() -> None:
    typed = StepOutputs.from_mapping(PLAIN)
    assert monitor_metrics(typed) == monitor_metrics(PLAIN)
    a, b = stats_from_outputs(typed), stats_from_outputs(PLAIN)
    assert a is not None and b is not None
    assert a.ids == b.ids and torch.equal(a.correct, b.correct) and torch.equal(a.count, b.count)
    module = pl.LightningModule()
    found = batch_outputs(PLAIN, module, "test")
    assert isinstance(found, StepOutputs) and found.as_dict() == PLAIN
    assert batch_outputs({}, module, "test") is None and batch_outputs(None, module, "test") is None
    module.difficulty_outputs = typed  # the tensor-return fallback may hold the typed outputs too
    assert batch_outputs({"loss": torch.tensor(1.0)}, module, "test") is typed


def test_the_batch_codes_are_the_choice_order() -> None:
    assert list(KIND_CODES) == list(STEP_KINDS) and list(KIND_CODES.values()) == list(range(len(STEP_KINDS)))
    assert list(TIER_CODES) == list(TIERS) and list(TIER_CODES.values()) == list(range(len(TIERS)))
