"""The released variant plan (core.released_plan): hand-worked draws, properties, and frequencies against the
authors' table (gen_new_item.py:378-414), plus its realisation by the real planner."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.released_plan import (
    RELEASED_ACTIONS,
    ReleasedAction,
    draw_released,
    hint_steps_released,
    released_steps,
)
from diva_lightning.core.seeding import stable_seed
from diva_lightning.core.tiers import plan_variants
from diva_lightning.data.planner import PlanSettings, plan_families
from diva_lightning.data.world import generate_world


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed("released-plan-test", seed))


def test_the_table_is_the_released_one_entry_for_entry() -> None:
    # gen_new_item.py:388-395: step +1 draws the original twice, a paraphrase twice, noise and rotation at 0.30
    assert [(a.name, a.intensity, a.label_shift) for a in RELEASED_ACTIONS[1]] == [
        ("origin", 0.0, 0), ("origin", 0.0, 0), ("paraphrase", 0.0, 0), ("noise", 0.30, 1), ("rotate", 0.30, 1),
        ("paraphrase", 0.0, 0)]
    # :409: step 4's noise and rotation move the label by 3, its "only vision" by 2
    assert [(a.name, a.label_shift) for a in RELEASED_ACTIONS[4]] == [
        ("noise", 3), ("rotate", 3), ("two_ops", 4), ("two_ops", 4), ("only_vision", 2)]
    assert [len(RELEASED_ACTIONS[s]) for s in range(1, 9)] == [6, 5, 4, 5, 3, 3, 3, 3]
    assert RELEASED_ACTIONS[0] == (ReleasedAction("paraphrase"),)
    assert all(RELEASED_ACTIONS[s] == (ReleasedAction("hint", 0.0, s),) for s in range(-8, 0))


@pytest.mark.parametrize(("d", "step"), [(1, 8), (2, 6), (3, 4), (4, 2), (5, 1), (6, -1), (7, -2), (8, -3), (9, -5)])
def test_one_variant_follows_the_target_table(d: int, step: int) -> None:
    # DIFFICULTY_MAPPING (gen_new_item.py:50-53): target - D; no draw is consumed
    g = gen()
    state = g.get_state()
    assert released_steps(d, 1, g) == [step]
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize(("step", "hint_steps"), [(-1, 1), (-2, 1), (-3, 2), (-4, 2), (-5, 3), (-6, 3), (-7, 9),
                                                  (-8, 9)])
def test_hint_length_by_step(step: int, hint_steps: int) -> None:
    # gen_think_step (gen_new_item.py:278-285): all steps from -7 on (here capped at max_hint_steps = 9)
    assert hint_steps_released(step, 9) == hint_steps
    assert hint_steps_released(step, 2) == min(hint_steps, 2)


def test_hand_worked_families() -> None:
    # D = 6 and 9, V = 1: a hint, original text, label shift = step, 1 and 3 steps
    (six,) = plan_variants(6.0, 1, generator=gen(), plan="released")
    assert (six.kind, six.delta, six.hint_steps, six.paraphrase_index) == ("hint", -1.0, 1, None)
    (nine,) = plan_variants(9.0, 1, generator=gen(), plan="released")
    assert (nine.kind, nine.delta, nine.hint_steps) == ("hint", -5.0, 3)
    # a fractional D is rounded half up: 5.5 -> 6
    assert plan_variants(5.5, 1, generator=gen(), plan="released")[0].kind == "hint"
    # D = 1 (step 8): two-op transforms (label +4 at 0.30 or +8 at 0.50) or "only vision" (+2)
    seen = {(s.kind, s.delta, s.intensity, s.image_ops) for seed in range(60)
            for s in plan_variants(1.0, 1, generator=gen(seed), plan="released")}
    assert seen == {("image", 4.0, 0.30, ("rotate", "noise")), ("image", 8.0, 0.50, ("rotate", "noise")),
                    ("only_vision", 2.0, 0.50, ())}
    # an image that carries text: the two-op transform rotates only (gen_new_item.py:313-315)
    ocr = {s.image_ops for seed in range(60)
           for s in plan_variants(1.0, 1, generator=gen(seed), plan="released", allowed_ops=("rotate",))}
    assert ocr == {("rotate",), ()}


def test_later_negative_steps_become_a_step_of_0_to_3() -> None:
    # gen_new_item.py:438-452: D = 9, mean 3: nearly every draw is negative; only the first is kept
    for seed in range(50):
        steps = released_steps(9, 4, gen(seed))
        negatives = [s for s in steps if s < 0]
        assert len(negatives) <= 1
        assert all(s in (0, 1, 2, 3) for s in steps if s >= 0)


@settings(max_examples=150, deadline=None)
@given(st.floats(1.0, 9.0), st.integers(0, 5), st.integers(0, 2**31), st.integers(0, 6))
def test_properties(d: float, v: int, seed: int, paraphrases: int) -> None:
    draws = draw_released(d, v, generator=gen(seed), num_paraphrases=paraphrases)
    assert len(draws) == v
    assert draws == draw_released(d, v, generator=gen(seed), num_paraphrases=paraphrases)  # deterministic
    assert sum(x.step < 0 for x in draws) <= 1  # at most one hint per family
    d_int = min(9, max(1, math.floor(d + 0.5)))
    for x in draws:
        assert x.action in RELEASED_ACTIONS[x.step]
        assert 1 <= d_int + x.step <= 9 + 3  # a replaced step may overshoot 9 (as released); labels are clipped
        assert x.paraphrase_index is None or 0 <= x.paraphrase_index < paraphrases
        if x.action.name in ("origin", "hint"):
            assert x.paraphrase_index is None
        if x.rotation_deg:
            unit = 45 if x.action.intensity < 0.25 else 30 if x.action.intensity < 0.45 else 1
            assert x.rotation_deg % unit == 0 and 1 <= x.rotation_deg <= 359
    specs = plan_variants(d, v, generator=gen(seed), plan="released", num_paraphrases=paraphrases)
    assert [s.delta for s in specs] == [float(x.action.label_shift) for x in draws]


def _within(count: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(count - n * p) <= z * math.sqrt(n * p * (1 - p)) + 1


@pytest.mark.parametrize("step_d", [(1, 5), (2, 4), (4, 3), (8, 1)])
def test_entry_frequencies_match_the_released_table(step_d: tuple[int, int]) -> None:
    step, d = step_d
    n, g = 6000, gen(step)
    table = RELEASED_ACTIONS[step]
    counts = Counter(x.action for _ in range(n) for x in draw_released(float(d), 1, generator=g))
    for action, multiplicity in Counter(table).items():
        assert _within(counts[action], n, multiplicity / len(table)), (action, counts[action], n)


def test_text_choice_frequencies() -> None:
    # select_variant_text: a paraphrase with p 1/2 (noise, rotation, paraphrase), behind another coin of 1/2 for
    # "only vision" (1/4) and of 0.2 + 0.07 * intensity for the two-op transform (D = 1, step 8)
    n = 8000
    paraphrased: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    g = gen(99)
    for d in (4.0, 1.0):
        for _ in range(n):
            (x,) = draw_released(d, 1, generator=g, num_paraphrases=5)
            key = f"{x.action.name}@{x.action.intensity}"
            totals[key] += 1
            paraphrased[key] += x.paraphrase_index is not None
    expected = {"noise@0.35": 0.5, "rotate@0.35": 0.5, "paraphrase@0.0": 0.5, "only_vision@0.5": 0.25,
                "two_ops@0.3": (0.2 + 0.07 * 0.3) / 2, "two_ops@0.5": (0.2 + 0.07 * 0.5) / 2}
    for key, p in expected.items():
        assert totals[key] > 500, key
        assert _within(paraphrased[key], totals[key], p), (key, paraphrased[key], totals[key])


def test_several_variants_follow_the_rounded_normal() -> None:
    # V >= 2: round(N(mean[D], 1)) clipped to [1, 9]; D = 5 has mean 6, so the first step is k - 5 with
    # probability P(k - 0.5 < N(6, 1) < k + 0.5)
    n, g = 6000, gen(7)
    first = Counter(released_steps(5, 2, g)[0] for _ in range(n))
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    for k in range(3, 10):
        upper = 1.0 if k == 9 else phi(k + 0.5 - 6)
        assert _within(first[k - 5], n, upper - phi(k - 0.5 - 6)), (k, first[k - 5])


def test_the_planner_realises_released_draws_and_labels_only_vision_as_a_fallback() -> None:
    records = generate_world(6, seed=3)
    settings_ = PlanSettings(num_variants=1, plan="released")
    kinds: Counter[str] = Counter()
    for seed in range(40):
        rows = plan_families(records, [4.0] * len(records), settings_, generator=gen(seed),
                             image_size=lambda b: (64, 64))
        for row in rows[1::2]:  # the variant of each family
            kinds[row.fallback_kind or row.kind] += 1
            if row.fallback is not None:
                assert row.fallback_kind == "only_vision" and row.kind == "original" and row.label == 4.0
            elif row.kind == "image":
                assert row.label == 6.0 and row.perturb is not None  # step 2 moves the label by 2
            elif row.kind == "original":  # a paraphrase entry that kept the original text (p 1/2)
                assert row.label == 4.0 and row.text == row.record.problem
    assert set(kinds) == {"image", "paraphrase", "original", "only_vision"}
