"""Tiers and the variant plan: hand-worked values, properties and the official tables."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.tiers import (
    IMAGE_OPS,
    OFFICIAL_V1_TARGET,
    VariantSpec,
    hint_steps_for,
    plan_variants,
    tier_codes,
    tier_of,
    tiers_of,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_tier_boundaries() -> None:
    # band 0.5 around 5: 4.49 easy, 4.5 and 5.5 medium (inclusive), 5.51 hard
    assert [tier_of(d) for d in (1.0, 4.49, 4.5, 5.0, 5.5, 5.51, 9.0)] == [
        "easy", "easy", "medium", "medium", "medium", "hard", "hard",
    ]  # fmt: skip
    d = torch.tensor([1.0, 4.49, 4.5, 5.0, 5.5, 5.51, 9.0])
    assert tier_codes(d).tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert tiers_of(d) == [tier_of(x) for x in d.tolist()]
    assert tier_of(4.0, band=1.0) == "medium"
    with pytest.raises(ValueError, match="NaN"):
        tier_of(float("nan"))


def test_hint_steps_official_bins() -> None:
    # official: 1 step for D in [6, 8), 2 for [8, 9), 3 for D >= 9; anything hard below 6 gets 1
    assert [hint_steps_for(d) for d in (5.6, 6.0, 7.0, 7.99, 8.0, 8.5, 9.0)] == [1, 1, 1, 1, 2, 2, 3]
    assert hint_steps_for(9.0, max_hint_steps=2) == 2


def test_tiers_plan_hand_worked() -> None:
    # medium: paraphrases with distinct indices, delta 0
    med = plan_variants(5.0, 3, generator=gen())
    assert [v.kind for v in med] == ["paraphrase"] * 3
    assert all(v.delta == 0.0 and v.tier == "medium" for v in med)
    assert len({v.paraphrase_index for v in med}) == 3
    # hard D=9: 3 steps, delta = -(9 - 5) * 3/3 = -4; D=6.5: 1 step, delta = -(1.5) * 1/3 = -0.5
    (h9,) = plan_variants(9.0, 1, generator=gen())
    assert (h9.kind, h9.hint_steps, h9.delta, h9.paraphrase_index) == ("hint", 3, -4.0, None)
    (h65,) = plan_variants(6.5, 1, generator=gen())
    assert (h65.hint_steps, h65.delta) == (1, pytest.approx(-0.5))
    # easy D=1 (= d_min): f = 1, intensity = 0.6, delta = (5 - 1) * 0.6 / 0.6 = 4 -> label 5; two ops
    (e1,) = plan_variants(1.0, 1, generator=gen())
    assert e1.kind == "image" and e1.intensity == pytest.approx(0.6) and e1.delta == pytest.approx(4.0)
    assert len(e1.image_ops) == 2
    # easy D=3.25: f = (4.5 - 3.25) / 3.5 = 0.357, intensity = 0.2 + 0.4 * 0.357 = 0.343,
    # delta = 1.75 * 0.343 / 0.6 = 1.0; one op
    (e3,) = plan_variants(3.25, 1, generator=gen())
    assert e3.intensity == pytest.approx(0.2 + 0.4 * 1.25 / 3.5)
    assert e3.delta == pytest.approx(1.75 * (0.2 + 0.4 * 1.25 / 3.5) / 0.6)
    assert len(e3.image_ops) == 1


def test_rotation_angles_follow_official_steps() -> None:
    # intensity < 0.25 -> multiples of 45, < 0.45 -> of 30, else any integer degree in [1, 359]
    seen: dict[str, set[float]] = {"45": set(), "30": set(), "1": set()}
    for seed in range(300):
        for d, key in ((4.4, "45"), (3.0, "30"), (1.0, "1")):
            for v in plan_variants(d, 1, generator=gen(seed)):
                if "rotate" in v.image_ops:
                    seen[key].add(v.rotation_deg)
                else:
                    assert v.rotation_deg == 0.0
    assert seen["45"] and all(a % 45 == 0 and 45 <= a <= 315 for a in seen["45"])
    assert seen["30"] and all(a % 30 == 0 and 30 <= a <= 330 for a in seen["30"])
    assert seen["1"] and all(1 <= a <= 359 for a in seen["1"]) and any(a % 30 for a in seen["1"])


@pytest.mark.parametrize("d", range(1, 10))
def test_official_v1_targets(d: int) -> None:
    target = OFFICIAL_V1_TARGET[d]
    (v,) = plan_variants(float(d), 1, plan="official", generator=gen())
    assert v.delta == target - d or (v.kind == "paraphrase" and target == d)
    expected_kind = "image" if target > d else "paraphrase" if target == d else "hint"
    assert v.kind == expected_kind
    if v.kind == "hint":
        # D=6,7 -> steps -1/-2 -> 1 hint; D=8 -> -3 -> 2; D=9 -> -5 -> 3 (same as hint_steps_for)
        assert v.hint_steps == hint_steps_for(float(d))
    if v.kind == "image":
        # official intensity ladder: step 1 -> .30, 2 -> .35, 3 -> .40, 4 -> .45, >= 5 -> .50
        assert v.intensity == pytest.approx(min(0.5, max(0.3, 0.25 + 0.05 * (target - d))))


@settings(max_examples=80, deadline=None)
@given(
    d=st.floats(1.0, 9.0, allow_nan=False),
    v=st.integers(0, 6),
    plan=st.sampled_from(["tiers", "official"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_plan_properties(d: float, v: int, plan: str, seed: int) -> None:
    specs = plan_variants(d, v, plan=plan, generator=gen(seed))
    assert len(specs) == v
    # deterministic given the generator
    assert specs == plan_variants(d, v, plan=plan, generator=gen(seed))
    for s in specs:
        assert isinstance(s, VariantSpec) and s.tier == tier_of(d)
        assert set(s.image_ops) <= set(IMAGE_OPS)
        assert list(s.image_ops) == sorted(s.image_ops, key=IMAGE_OPS.index)  # canonical order
        # sign of delta follows the kind
        if s.kind == "image":
            assert s.delta > 0 and 0 < s.intensity <= 1 and s.image_ops
        elif s.kind == "paraphrase":
            assert s.delta == 0
        else:
            assert s.delta < 0 and s.hint_steps >= 1
        assert 1.0 <= d + s.delta <= 9.0
    if plan == "tiers":
        kinds = {"easy": "image", "medium": "paraphrase", "hard": "hint"}
        assert all(s.kind == kinds[tier_of(d)] for s in specs)
    else:
        assert sum(s.kind == "hint" for s in specs) <= 1  # at most one hint per family


def test_easy_intensity_and_delta_grow_as_difficulty_falls() -> None:
    ds = [4.4, 4.0, 3.0, 2.0, 1.0]
    first = [plan_variants(d, 1, generator=gen())[0] for d in ds]
    intens = [s.intensity for s in first]
    deltas = [s.delta for s in first]
    assert intens == sorted(intens) and deltas == sorted(deltas)


def test_official_many_variants_draw_around_table_mean() -> None:
    # D=1: mean target 8, so the targets are mostly image variants with delta near 7
    g = gen(123)
    specs = [s for _ in range(200) for s in plan_variants(1.0, 4, plan="official", generator=g)]
    deltas = torch.tensor([s.delta for s in specs])
    assert abs(deltas.mean().item() - 7.0) < 0.2
    assert all(s.kind == "image" for s in specs if s.delta > 0)


def test_paraphrases_cycle_and_none_without_material() -> None:
    specs = plan_variants(5.0, 7, num_paraphrases=3, generator=gen())
    idx = [s.paraphrase_index for s in specs]
    assert sorted(idx[:3]) == [0, 1, 2] and sorted(idx[3:6]) == [0, 1, 2]
    assert all(s.paraphrase_index is None for s in plan_variants(5.0, 2, num_paraphrases=0, generator=gen()))


def test_variant_spec_validation() -> None:
    with pytest.raises(ValueError, match="kind"):
        VariantSpec("crop", "easy", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="intensity"):
        VariantSpec("image", "easy", 1.0, intensity=1.5)
    with pytest.raises(ValueError, match="unknown image_ops"):
        VariantSpec("image", "easy", 1.0, 0.5, ("shear",))
    with pytest.raises(ValueError, match="rotation_deg"):
        VariantSpec("image", "easy", 1.0, 0.5, ("noise",), rotation_deg=30.0)
    with pytest.raises(ValueError, match="hint_steps"):
        VariantSpec("paraphrase", "medium", 0.0, hint_steps=2)


def test_plan_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="outside"):
        plan_variants(9.5, 1, generator=gen())
    with pytest.raises(ValueError, match="plan"):
        plan_variants(5.0, 1, plan="random", generator=gen())
    with pytest.raises(ValueError, match="num_variants"):
        plan_variants(5.0, -1, generator=gen())


# ---- allowed_ops (records with text in the image: rotation only) -----------------------------------------


def test_allowed_ops_rotation_only_hand_worked() -> None:
    # tiers plan, D=1: intensity 0.6 >= 0.45 would combine two ops; with rotation only it rotates alone,
    # by an integer degree (intensity >= 0.45)
    (e1,) = plan_variants(1.0, 1, generator=gen(), allowed_ops=("rotate",))
    assert e1.image_ops == ("rotate",) and 1 <= e1.rotation_deg <= 359
    assert e1.intensity == pytest.approx(0.6) and e1.delta == pytest.approx(4.0)  # unchanged by the option
    # official plan, D=1, V=1: target 9, step 8 >= 4 -> two ops by default, rotation alone here
    (o1,) = plan_variants(1.0, 1, plan="official", generator=gen(), allowed_ops=("rotate",))
    assert o1.kind == "image" and o1.image_ops == ("rotate",) and o1.delta == 8.0
    # two allowed ops and a two-op variant: both, in canonical order whatever order they were given in
    (both,) = plan_variants(1.0, 1, generator=gen(), allowed_ops=("blur", "rotate"))
    assert both.image_ops == ("rotate", "blur")
    # non-image tiers are untouched
    assert plan_variants(9.0, 2, generator=gen(), allowed_ops=("rotate",)) == plan_variants(9.0, 2, generator=gen())


@settings(max_examples=60, deadline=None)
@given(
    d=st.floats(1.0, 9.0, allow_nan=False),
    v=st.integers(0, 4),
    plan=st.sampled_from(["tiers", "official"]),
    seed=st.integers(0, 2**31 - 1),
    allowed=st.lists(st.sampled_from(IMAGE_OPS), min_size=1, max_size=5, unique=True),
)
def test_allowed_ops_properties(d: float, v: int, plan: str, seed: int, allowed: list[str]) -> None:
    specs = plan_variants(d, v, plan=plan, generator=gen(seed), allowed_ops=tuple(allowed))
    d_int = math.floor(d + 0.5)
    for s in specs:
        assert set(s.image_ops) <= set(allowed)
        if s.kind == "image":
            # two ops from intensity 0.45 on (tiers) or from a target step of 4 on (official)
            two = s.intensity >= 0.45 if plan == "tiers" else round(d + s.delta) - d_int >= 4
            assert len(s.image_ops) == min(2 if two else 1, len(allowed))
            assert (s.rotation_deg != 0.0) == ("rotate" in s.image_ops)
    if plan == "tiers":  # the option changes the ops, not the tiers' kinds
        assert [s.kind for s in specs] == [s.kind for s in plan_variants(d, v, generator=gen(seed))]
    # all ops allowed is the default, draw for draw
    default = plan_variants(d, v, plan=plan, generator=gen(seed))
    assert plan_variants(d, v, plan=plan, generator=gen(seed), allowed_ops=IMAGE_OPS) == default


def test_allowed_ops_draws_uniformly() -> None:
    # one-op variants (D=3: intensity 0.43 < 0.45) with two allowed ops: each about half of the time
    g = gen(7)
    ops = [plan_variants(3.0, 1, generator=g, allowed_ops=("noise", "blur"))[0].image_ops for _ in range(400)]
    assert set(ops) == {("noise",), ("blur",)}
    assert abs(ops.count(("noise",)) / 400 - 0.5) < 0.08  # binomial sd 0.025


def test_allowed_ops_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="non-empty subset"):
        plan_variants(1.0, 1, generator=gen(), allowed_ops=())
    with pytest.raises(ValueError, match="non-empty subset"):
        plan_variants(1.0, 1, generator=gen(), allowed_ops=("shear",))


# ---- plan="paraphrase" (Share-GRPO: a paraphrase for every question, no difficulty adaptation) ------------


def _reference_paraphrase_plan(
    d: float, v: int, n: int, g: torch.Generator
) -> list[tuple[str, str, float, int | None]]:
    """Independent reading of the spec: V rewordings, delta 0, indices from shuffled passes over the n
    paraphrases (a new torch.randperm(n) each time a pass is used up), None when there are none."""
    out, queue = [], []
    for _ in range(v):
        if n and not queue:
            queue = torch.randperm(n, generator=g).tolist()
        out.append(("paraphrase", tier_of(d), 0.0, queue.pop(0) if n else None))
    return out


def test_paraphrase_plan_hand_worked() -> None:
    # an easy question (D=1) and a hard one (D=9) get paraphrases, not image variants or hints; delta 0, so the
    # label stays D; the tier is still recorded
    easy = plan_variants(1.0, 3, plan="paraphrase", generator=gen())
    assert [(s.kind, s.tier, s.delta) for s in easy] == [("paraphrase", "easy", 0.0)] * 3
    assert len({s.paraphrase_index for s in easy}) == 3  # 3 of the 5 stored paraphrases, no repeats
    hard = plan_variants(9.0, 2, plan="paraphrase", generator=gen())
    assert [(s.kind, s.tier, s.hint_steps, s.image_ops) for s in hard] == [("paraphrase", "hard", 0, ())] * 2
    # 2 paraphrases, 5 variants: both used once before any repeats -> first pass {0, 1}, second pass {0, 1}
    idx = [s.paraphrase_index for s in plan_variants(7.0, 5, plan="paraphrase", num_paraphrases=2, generator=gen())]
    assert sorted(idx[:2]) == [0, 1] and sorted(idx[2:4]) == [0, 1] and idx[4] in (0, 1)
    # a record without paraphrases: the index is None (the planner then falls back to a labelled original)
    assert [s.paraphrase_index for s in plan_variants(3.0, 2, plan="paraphrase", num_paraphrases=0,
                                                      generator=gen())] == [None, None]


@settings(max_examples=60, deadline=None)
@given(
    d=st.floats(1.0, 9.0, allow_nan=False),
    other=st.floats(1.0, 9.0, allow_nan=False),
    v=st.integers(0, 7),
    n=st.integers(0, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_paraphrase_plan_properties(d: float, other: float, v: int, n: int, seed: int) -> None:
    specs = plan_variants(d, v, plan="paraphrase", num_paraphrases=n, generator=gen(seed))
    assert len(specs) == v
    assert all(s.kind == "paraphrase" and s.delta == 0.0 and s.tier == tier_of(d) for s in specs)
    # no repeats within a pass over the stored paraphrases
    idx = [s.paraphrase_index for s in specs]
    if n == 0:
        assert idx == [None] * v
    else:
        for start in range(0, v, n):
            block = idx[start:start + n]
            assert len(set(block)) == len(block) and all(0 <= i < n for i in block)  # type: ignore[operator]
    # difficulty changes nothing but the recorded tier (no adaptation), and the tiers plan of a medium
    # question plans exactly the same variants
    moved = plan_variants(other, v, plan="paraphrase", num_paraphrases=n, generator=gen(seed))
    medium = plan_variants(5.0, v, plan="tiers", num_paraphrases=n, generator=gen(seed))
    strip = [(s.kind, s.delta, s.paraphrase_index) for s in specs]
    assert strip == [(s.kind, s.delta, s.paraphrase_index) for s in moved]
    assert strip == [(s.kind, s.delta, s.paraphrase_index) for s in medium]


@pytest.mark.parametrize(("d", "v", "n", "seed"), [(1.0, 4, 5, 0), (5.0, 7, 3, 1), (8.7, 3, 0, 2), (4.49, 9, 2, 3)])
def test_paraphrase_plan_matches_reference(d: float, v: int, n: int, seed: int) -> None:
    specs = plan_variants(d, v, plan="paraphrase", num_paraphrases=n, generator=gen(seed))
    got = [(s.kind, s.tier, s.delta, s.paraphrase_index) for s in specs]
    assert got == _reference_paraphrase_plan(d, v, n, gen(seed))
