"""Variant text edits: paraphrase selection, clamped hints, rotation notice, visible fallbacks.

Uses the real ``core.tiers.VariantSpec`` and planner, and records from the real world generator."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from diva_lightning.core.tiers import VariantSpec, plan_variants
from diva_lightning.data.schema import QuestionRecord
from diva_lightning.data.variants import (
    VariantText,
    hint_step_count,
    render_variant,
    rotation_notice,
    variant_prompt,
)
from diva_lightning.data.world import generate_world

RECORD = QuestionRecord(
    "q", "How many red shapes are in <image>?", "3", [b"\x89PNG\r\n\x1a\n"],
    variants=["P0 <image>", "P1 <image>", "P2 <image>"],
    think_steps=["Row 1: 1 red. Total 1.", "Row 2: 2 red. Total 3.", "Row 3: 0 red. Total 3."],
)


def hint(steps: int, paraphrase_index: int | None = None) -> VariantSpec:
    return VariantSpec("hint", "hard", -1.0, hint_steps=steps, paraphrase_index=paraphrase_index)


def test_paraphrase_picks_the_stored_text_modulo_its_count() -> None:
    for index, expected in [(0, "P0 <image>"), (2, "P2 <image>"), (4, "P1 <image>")]:
        spec = VariantSpec("paraphrase", "medium", 0.0, paraphrase_index=index)
        assert render_variant(RECORD, spec).prompt == expected
        assert render_variant(RECORD, spec).fallback is None


def test_paraphrase_without_material_falls_back_visibly(caplog: pytest.LogCaptureFixture) -> None:
    bare = QuestionRecord("bare", "Q <image>", "1", [b"x"])
    spec = VariantSpec("paraphrase", "medium", 0.0, paraphrase_index=1)
    assert render_variant(bare, spec).fallback == "no paraphrases"
    with caplog.at_level(logging.WARNING):
        assert variant_prompt(bare, spec) == "Q <image>"
    assert "'bare' fell back to the original problem: no paraphrases" in caplog.text
    no_index = VariantSpec("paraphrase", "medium", 0.0)
    expected = VariantText(RECORD.problem, fallback="paraphrase_index is None")
    assert render_variant(RECORD, no_index) == expected


def test_hint_appends_the_first_steps_and_never_the_whole_solution() -> None:
    one = variant_prompt(RECORD, hint(1))
    assert one == "How many red shapes are in <image>?\nHint: Row 1: 1 red. Total 1."
    # 3 steps: asking for 3 or 9 reveals only 2, leaving the last row to count.
    two = "How many red shapes are in <image>?\nHint: Row 1: 1 red. Total 1. Row 2: 2 red. Total 3."
    assert variant_prompt(RECORD, hint(3)) == two and variant_prompt(RECORD, hint(9)) == two
    # A hint variant may also be reworded by the planner: the hint goes after the paraphrase.
    assert variant_prompt(RECORD, hint(1, paraphrase_index=1)) == "P1 <image>\nHint: Row 1: 1 red. Total 1."


def test_hint_step_count_clamp() -> None:
    assert [hint_step_count(k, 4) for k in (0, 1, 3, 4, 10)] == [0, 1, 3, 3, 3]
    assert [hint_step_count(k, 1) for k in (1, 3)] == [1, 1]  # a single step can only be given whole
    assert hint_step_count(2, 0) == 0


def test_hint_without_steps_falls_back_visibly() -> None:
    bare = QuestionRecord("bare", "Q", "1")
    assert render_variant(bare, hint(2)).fallback == "no think steps"
    assert render_variant(bare, hint(2)).prompt == "Q"


def test_rotation_notice_official_wording() -> None:
    spec = VariantSpec("image", "easy", 1.0, intensity=0.2, image_ops=("rotate", "noise"), rotation_deg=45.0)
    assert variant_prompt(RECORD, spec) == (
        "How many red shapes are in <image>? This image has been rotated by 45 degrees. "
        "Please mentally rotate it back and solve the problem.")
    assert "rotated by 12.5 degrees" in rotation_notice(12.5)
    blur = VariantSpec("image", "easy", 1.0, intensity=0.2, image_ops=("blur",))
    assert variant_prompt(RECORD, blur) == RECORD.problem
    full_turn = SimpleNamespace(kind="image", image_ops=("rotate",), rotation_deg=360.0, hint_steps=0,
                                paraphrase_index=None)
    assert variant_prompt(RECORD, full_turn) == RECORD.problem


def test_duck_typed_spec_and_unknown_kind() -> None:
    spec = SimpleNamespace(kind="hint", image_ops=(), rotation_deg=0.0, hint_steps=1, paraphrase_index=None)
    assert variant_prompt(RECORD, spec).endswith("Hint: Row 1: 1 red. Total 1.")
    with pytest.raises(ValueError, match="unknown variant kind"):
        variant_prompt(RECORD, SimpleNamespace(kind="audio", image_ops=(), rotation_deg=0.0, hint_steps=0,
                                               paraphrase_index=None))


@pytest.mark.parametrize("plan", ["tiers", "official"])
def test_planned_variants_of_world_questions_keep_one_image_and_never_fall_back(plan: str) -> None:
    records = generate_world(8, seed=5)
    g = torch.Generator().manual_seed(0)
    for record in records:
        for difficulty in (1.0, 3.0, 5.0, 7.0, 9.0):
            for spec in plan_variants(difficulty, 3, generator=g, plan=plan):
                text = render_variant(record, spec)
                assert text.fallback is None
                assert text.prompt.count("<image>") == 1
                if spec.kind == "hint":  # the revealed rows never include the final conclusion
                    assert record.think_steps[-1] not in text.prompt
