"""Prompts that cannot fit the policy are named before the model loads, or skipped and counted (never cut)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from diva_lightning.cli import run_cli
from diva_lightning.data.planner import PlanSettings, plan_families
from diva_lightning.data.schema import QuestionRecord, RecordError, decode_image, write_records
from diva_lightning.data.world import generate_world
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.system.datamodule import DivaDataModule
from diva_lightning.training.prompt_budget import PromptMeasure, longest_prompt, prompt_limit
from tests.test_module import small_args


def _measure(bundle: PolicyBundle) -> PromptMeasure:
    return PromptMeasure(bundle.tokenizer, bundle.prompt, bundle.vision_spec)


def _encoded_length(bundle: PolicyBundle, text: str, image: torch.Tensor) -> int:
    return int(bundle.encode([text], [[image] * text.count("<image>")])["attention_mask"].sum())


def test_measure_equals_the_encoder(bundle: PolicyBundle) -> None:
    """The tokenizer-only count is what PolicyBundle.encode builds, images (any size) included."""
    measure = _measure(bundle)
    record = generate_world(1, seed=0, split="val")[0]
    for size in ((112, 112), (56, 300), (400, 90)):
        image = torch.rand(3, *size)
        for text in (record.problem, record.variants[2], "no image here"):
            sizes = [size] * text.count("<image>")
            assert measure.length(text, sizes) == _encoded_length(bundle, text, image), (size, text)


def test_longest_prompt_bounds_every_planned_variant(bundle: PolicyBundle) -> None:
    measure = _measure(bundle)
    records = generate_world(12, seed=0, split="train")
    image = decode_image(records[0].images[0])
    bound = {r.id: longest_prompt(r, measure, [(112, 112)], with_variants=True) for r in records}
    seen_equal = False
    for d in (1.0, 3.0, 5.0, 7.0, 9.0):
        for seed in range(3):
            rows = plan_families(records, [d] * len(records), PlanSettings(num_variants=3),
                                 generator=torch.Generator().manual_seed(seed), image_size=lambda b: (112, 112))
            for row in rows:
                n = _encoded_length(bundle, row.text, image)
                assert n <= bound[row.record.id]
                seen_equal |= n == bound[row.record.id]
    assert seen_equal  # the bound is attained (hints with all but one step), not loose


def test_limit_is_the_context_minus_the_budget() -> None:
    assert prompt_limit(context=4096, max_new_tokens=96, max_prompt_length=None) == 4000
    assert prompt_limit(context=4096, max_new_tokens=96, max_prompt_length=2048) == 2048
    assert prompt_limit(context=4096, max_new_tokens=96, max_prompt_length=8000) == 4000
    with pytest.raises(ValueError, match="set policy_config.max_prompt_length"):
        prompt_limit(context=None, max_new_tokens=96, max_prompt_length=None)


def test_a_prompt_longer_than_the_context_is_named_before_the_model_loads(tiny_policy_dir: str,
                                                                           tmp_path: Path) -> None:
    """Issue 16: a 5,074-token prompt on a 4,096-token policy was silently accepted."""
    words = " ".join(["count"] * 5000)
    records = [QuestionRecord(id=f"q{i}", problem=f"What is {i}?", answer=str(i)) for i in range(4)]
    records.append(QuestionRecord(id="long", problem=f"{words} What is 7?", answer="7"))
    data = write_records(records, tmp_path / "d.jsonl")
    args = small_args(tiny_policy_dir, tmp_path / "run", "--data.init_args.train_source", str(data),
                      "--data.init_args.val_source", str(data), "--data.init_args.test_source", "null")
    with pytest.raises(RecordError, match=r"d.jsonl:row 5 \(id 'long'\): field 'problem': its longest prompt .* is "
                                          r"\d+ tokens, over the limit of 4016$"):  # 4096 - 80 (validation budget)
        run_cli(args)
    assert not list((tmp_path / "run").rglob("metrics.csv"))


def test_skip_drops_and_counts(bundle: PolicyBundle, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    measure = _measure(bundle)
    dm = DivaDataModule(questions_per_step=2, world=None)
    dm.world.train_size, dm.world.val_size = 40, 8
    dm.setup("fit")
    lengths = {r.id: longest_prompt(r, measure, dm.images.sizes(r), with_variants=True) for r in dm.train_records}
    limit = sorted(lengths.values())[len(lengths) // 2]
    expected = sorted(q for q, n in lengths.items() if n > limit)
    assert 0 < len(expected) < len(lengths)
    with caplog.at_level(logging.WARNING):
        dropped = dm.enforce_prompt_budget(lambda r, s, v: longest_prompt(r, measure, s, with_variants=v),
                                           limit, "skip")
    assert dropped >= len(expected)  # the validation questions are measured too (originals only)
    assert sorted(set(lengths) - {r.id for r in dm.train_records}) == expected
    assert f"skipped {dropped} question(s) whose prompt exceeds {limit} tokens" in caplog.text
