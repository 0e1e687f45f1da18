"""reports/zero_spread.py: the equal-budget bound by hand and by properties, and a real measurement of a policy."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.metrics import zero_spread_probability
from reports.zero_spread import (
    crossover,
    diva_floor,
    main,
    measure,
    plot_sweep,
    subset_zero_spread,
    summarise,
    sweep_curves,
)


def test_subset_zero_spread_by_hand() -> None:
    # 4 rewards (1, 1, 1, 0.1): pairs all equal: C(3,2) / C(4,2) = 3/6; triples: C(3,3) / C(4,3) = 1/4
    assert subset_zero_spread([1, 1, 1, 0.1], 2) == pytest.approx(0.5)
    assert subset_zero_spread([1, 1, 1, 0.1], 3) == pytest.approx(0.25)
    assert subset_zero_spread([0.1] * 5, 5) == 1.0
    with pytest.raises(ValueError, match="need 1 <= n <= 3"):
        subset_zero_spread([1, 0, 1], 4)


def test_crossover_by_hand() -> None:
    # G = 5, V = 1: at the crossover p, p^10 + q^10 equals (p^5 + q^5 + 1/16) / 2
    c = crossover(5, 1)
    assert c == pytest.approx(0.8893, abs=1e-4)
    lhs = float(zero_spread_probability(c, 10))
    assert lhs == pytest.approx((c**5 + (1 - c) ** 5 + 1 / 16) / 2, abs=1e-9)
    # more variants of the same size make the original's share smaller but GRPO's group larger
    assert crossover(5, 3) > c


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.0, 1.0), g=st.integers(2, 8), v=st.integers(1, 3))
def test_floor_is_a_floor(p: float, g: int, v: int) -> None:
    x = torch.tensor(p, dtype=torch.float64)
    floor = float(diva_floor(x, g, v))
    unchanged = float(zero_spread_probability(x, g))  # variants as hard as the original
    assert floor <= unchanged + 1e-12
    # every local group has probability >= 2^(1-g), so no variant design beats the floor
    assert floor >= 2.0 ** (1 - g) - 1e-12
    # the floor only beats GRPO beyond the crossover (symmetric about 0.5)
    beats = floor < float(zero_spread_probability(x, (v + 1) * g))
    c = crossover(g, v)
    if abs(p - 0.5) < c - 0.5 - 1e-6:
        assert not beats


def test_subset_estimator_is_unbiased_against_the_closed_form() -> None:
    # Averaged over all Binomial(m, p) outcomes, the subset estimate equals p^n + (1 - p)^n exactly.
    m, n, p = 12, 5, 0.7
    expected = sum(math.comb(m, k) * p**k * (1 - p) ** (m - k) * subset_zero_spread([1] * k + [0] * (m - k), n)
                   for k in range(m + 1))
    assert expected == pytest.approx(float(zero_spread_probability(p, n)))


def test_summarise_by_hand() -> None:
    # two questions, 10 samples each: q0 always right (reward 1), q1 half right
    q0, q1 = [1.0] * 10, [1.0] * 5 + [0.1] * 5
    m = summarise([q0, q1], [[1.0] * 10, [1.0] * 5 + [0.0] * 5], temperature=1.0, group=5, variants=1)
    assert m.accuracy == pytest.approx(0.75)
    assert m.grpo == pytest.approx(0.5)  # q0: 1, q1: no 10-subset is all equal
    q1_local = 2 / math.comb(10, 5)  # the two all-equal 5-subsets of q1
    assert m.diva_unchanged == pytest.approx((1 + q1_local) / 2)
    assert m.diva_floor == pytest.approx(((1 + 1 / 16) / 2 + (q1_local + 1 / 16) / 2) / 2)
    assert m.beyond_crossover == pytest.approx(0.5)  # only q0 (p = 1) is beyond the crossover


def test_measure_real_policy_and_cli(tiny_policy_dir: str, tmp_path: Path) -> None:
    (row,) = measure(tiny_policy_dir, temperatures=[1.0], questions=4, samples=10, group=5, variants=1,
                     batch_size=4, max_new_tokens=8)
    assert (row.questions, row.samples) == (4, 10)
    # an untrained policy answers nothing right and rarely formats: rewards mostly 0, groups mostly flat
    assert 0.0 <= row.accuracy <= 0.1
    assert row.grpo <= row.diva_unchanged + 1e-12  # a 10-subset all equal implies its 5-subsets are
    assert row.diva_floor <= row.diva_unchanged + 1e-12
    main(["--out", str(tmp_path / "zs.png")])
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "zs.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0


def _metrics(path: Path, rows: list[dict[str, float]]) -> None:
    """A CSVLogger-shaped metrics.csv: one row per step (Lightning's step = steps done - 1)."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    cols = sorted({k for r in rows for k in r} | {"step"})
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({"step": i, **r})


def test_sweep_curves_by_hand(tmp_path: Path) -> None:
    # full, two seeds, two steps; the image kind only occurs at step 2 in seed 0
    _metrics(tmp_path / "runs/full/s0/metrics.csv", [
        {"frac_reward_zero_std": 0.5, "frac_reward_zero_std/original": 0.5},
        {"frac_reward_zero_std": 0.25, "frac_reward_zero_std/original": 0.25, "frac_reward_zero_std/image": 1.0}])
    _metrics(tmp_path / "runs/full/s1/metrics.csv", [
        {"frac_reward_zero_std": 0.3, "frac_reward_zero_std/original": 0.3},
        {"frac_reward_zero_std": 0.15, "frac_reward_zero_std/original": 0.15}])
    _metrics(tmp_path / "runs/grpo/s0/metrics.csv", [{"frac_reward_zero_std": 0.1}, {"frac_reward_zero_std": 0.2}])
    c = sweep_curves(tmp_path, group=5, variants=1, window=2)
    # seed means 0.4, 0.2 -> rolling (window 2): 0.4, 0.3
    assert c["full"][0] == [1, 2] and c["full"][1] == pytest.approx([0.4, 0.3])
    assert c["full/image"] == ([2], [1.0])  # only where the kind occurred, at its real step
    # floor from the originals: (0.4 + 1/16) / 2, then rolling originals 0.3 -> (0.3 + 1/16) / 2
    assert c["full floor"][1] == pytest.approx([(0.4 + 1 / 16) / 2, (0.3 + 1 / 16) / 2])
    assert c["grpo"][1] == pytest.approx([0.1, 0.15]) and "grpo_n5" not in c
    with pytest.raises(FileNotFoundError, match=r"runs/full: no runs/full/\*/metrics.csv"):
        sweep_curves(tmp_path / "runs/full")  # a folder without the rows
    png = plot_sweep(c, tmp_path / "runs.png")
    import matplotlib.image as mpimg

    assert mpimg.imread(png).std() > 0
