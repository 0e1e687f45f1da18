"""Calibration report: the accuracy arithmetic on hand-built samples, the variants it feeds the policy (the
real ones), and the files it writes (through the real command on a real tiny policy)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from diva_lightning.data.schema import decode_image
from diva_lightning.data.variants import HINT_PREFIX
from diva_lightning.data.world import generate_world, world_corpus
from diva_lightning.models.tiny import build_tiny_policy
from tools import calibrate as C


def _s(cond: str, level: int, correct: float, formatted: float = 1.0) -> C.Sample:
    return C.Sample(cond, level, "count_color", f"q{level}", correct, formatted)


# Hand-built: original is right on 2/2 at level 1, 1/4 at level 5; the hint is right 3/4 at level 5.
SAMPLES = [
    _s("original", 1, 1.0), _s("original", 1, 1.0),
    _s("original", 5, 1.0), _s("original", 5, 0.0, 0.0), _s("original", 5, 0.0), _s("original", 5, 0.0),
    _s("hint1", 5, 1.0), _s("hint1", 5, 1.0), _s("hint1", 5, 1.0), _s("hint1", 5, 0.0),
]


def test_aggregate_means_per_level_and_pooled() -> None:
    cells = {(c.condition, c.level): c for c in C.aggregate(SAMPLES)}
    assert cells["original", 1].accuracy == 1.0 and cells["original", 1].n == 2
    assert cells["original", 5].accuracy == 0.25 and cells["original", 5].format_rate == 0.75
    # pooled over levels: 3 right of 6, 5 formatted of 6
    assert cells["original", -1].accuracy == 0.5 and cells["original", -1].n == 6
    assert cells["original", -1].format_rate == pytest.approx(5 / 6)
    # a condition without samples at a level is an empty cell, not a zero
    assert cells["hint1", 1].n == 0 and math.isnan(cells["hint1", 1].accuracy)


def test_effects_are_signed_point_differences_on_the_right_levels() -> None:
    eff = C.effects(SAMPLES)
    # hard levels (4, 5): hint 3/4 vs original 1/4 -> +50 points; no plan@1 / paraphrase samples -> NaN
    assert eff.hint_on_hard == pytest.approx(50.0)
    assert math.isnan(eff.perturb_on_easy) and math.isnan(eff.paraphrase_all)


def test_grade_uses_the_rl_rewards() -> None:
    responses = ["<think> Row 1: 3 red. Total 3. </think> \\boxed{3}", "\\boxed{3}",
                 "<think> Row 1: 4 red. Total 4. </think> \\boxed{4}",
                 "<think> 1 red, 2 blue, so B. </think> \\boxed{B}"]
    acc, fmt = C.grade(responses, ["3", "3", "3", "B"])
    assert acc == [1.0, 1.0, 0.0, 1.0]
    assert fmt == [1.0, 0.0, 1.0, 1.0]


@pytest.fixture(scope="module")
def val_records() -> list:
    return generate_world(8, seed=0, split="val")


def test_condition_inputs_are_the_real_variants(val_records: list) -> None:
    clean = [decode_image(r.images[0], None) for r in val_records]
    conds = {c.name: c for c in C.standard_conditions()}

    problems, images = C.condition_inputs(val_records, conds["original"], seed=0)
    assert problems == [r.problem for r in val_records]
    assert all(torch.equal(a, b) for a, b in zip(images, clean))

    problems, _ = C.condition_inputs(val_records, conds["paraphrase"], seed=0)
    assert problems == [r.variants[i % 5] for i, r in enumerate(val_records)]

    problems, images = C.condition_inputs(val_records, conds["hint2"], seed=0)
    for p, r in zip(problems, val_records):
        assert p == f"{r.problem}\n{HINT_PREFIX} {r.think_steps[0]} {r.think_steps[1]}"

    _, images = C.condition_inputs(val_records, conds["blank"], seed=0)
    assert all(bool((im == 1).all()) for im in images)

    # rotation: the prompt announces the angle, the image changes
    problems, images = C.condition_inputs(val_records, conds["rotate@0.6"], seed=0)
    assert all("has been rotated by" in p for p in problems)
    assert all(not torch.equal(a, b) for a, b in zip(images, clean))

    # the strongest planned easy variant: intensity 0.6 with two ops, as plan_variants makes it
    specs = [C.variant_spec(conds["plan@1"], i, seed=0) for i in range(len(val_records))]
    assert all(s is not None and s.kind == "image" and s.intensity == pytest.approx(0.6)
               and len(s.image_ops) == 2 for s in specs)
    _, images = C.condition_inputs(val_records, conds["plan@1"], seed=0)
    mean_change = [float((a - b).abs().mean()) for a, b in zip(images, clean)]
    assert min(mean_change) > 0.01
    # noise grows with the intensity
    diffs = []
    for t in C.INTENSITIES:
        _, imgs = C.condition_inputs(val_records, conds[f"noise@{t:g}"], seed=0)
        diffs.append(sum(float((a - b).abs().mean()) for a, b in zip(imgs, clean)))
    assert diffs == sorted(diffs) and diffs[0] > 0


def test_write_report_files(tmp_path: Path) -> None:
    paths = C.write_report(tmp_path, SAMPLES, SAMPLES[:6], meta="test")
    rows = list(csv.DictReader(paths["csv"].open()))
    # greedy: 2 conditions x (2 levels + pooled); sampled: 1 condition x 3
    assert len(rows) == 9
    row = next(r for r in rows if r["condition"] == "original" and r["level"] == "5")
    assert float(row["accuracy"]) == 0.25 and int(row["n"]) == 4
    md = paths["md"].read_text()
    assert "| original | 1.00 (n=2) | 0.25 (n=4) | 0.50 (n=6) | 0.83 |" in md
    assert "+50.0 points" in md
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_command_runs_on_a_real_tiny_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = build_tiny_policy(tmp_path / "policy", world_corpus(generate_world(20, seed=0)), seed=0)
    paths = C.main(["--policy", str(policy), "--out", str(tmp_path / "report"), "--n", "4",
                    "--max_new_tokens", "4", "--no_sampled"])
    rows = list(csv.DictReader(paths["csv"].open()))
    conditions = {r["condition"] for r in rows}
    assert conditions == {c.name for c in C.standard_conditions()}
    # an untrained policy never writes the format in 4 tokens
    assert all(float(r["format_rate"]) == 0.0 for r in rows)
    total = len(C.standard_conditions())
    assert f"[{total}/{total}]" in capsys.readouterr().out  # progress reached the last condition


def test_skew_report_by_hand(tmp_path: Path) -> None:
    """The skew verdicts on hand-built samples: paired hint gains, the strongest perturbation, counts by table."""
    def s(cond: str, qid: str, correct: float) -> C.Sample:
        return C.Sample(cond, 1, "count_plus", qid, correct, 1.0)

    hard = [s("original", "a", 0.0), s("original", "a", 0.0), s("original", "b", 1.0), s("original", "b", 0.0),
            s("hint3", "a", 1.0), s("hint3", "a", 1.0)]  # hint3 only asked of 'a': paired gain 1.0 - 0.0
    easy = [s("original", "c", 1.0), s("original", "c", 1.0), s("blank", "c", 1.0), s("blank", "c", 0.0),
            s("plan@1", "c", 0.0), s("plan@1", "c", 1.0), s("noise@1", "c", 0.0), s("noise@1", "c", 0.0)]
    paths = C.skew_report(tmp_path, {"hard": hard, "easy": easy}, meta="hand-built",
                          table_counts=({"a": 0, "b": 1, "c": 16}, 16))
    md = paths["md"].read_text()
    assert "hard: p = 0.250 (goal < 0.1: NOT met); best hint hint3: +100.0 points" in md
    assert "strongest single condition noise@1: -100.0 points; goal <= -15: met" in md
    assert "easy: p = 1.000 (goal > 0.9: met)" in md
    # by the table's count: 'a' (0 of 16) re-measured 0/2, 'b' (1 of 16) 1/2
    assert "| table: 0 of 16 right | 1 | 0.000 |" in md and "| table: 1 of 16 right | 1 | 0.500 |" in md
    with open(paths["csv"]) as f:
        rows = {(r["share"], r["condition"], r["family"]): float(r["accuracy"]) for r in csv.DictReader(f)}
    assert rows["easy", "blank", "all"] == 0.5 and rows["hard", "hint3", "count_plus"] == 1.0
    assert paths["png"].stat().st_size > 0


def test_skew_verdict_is_on_the_run_planners_weaker_variant(tmp_path: Path) -> None:
    """With the run's planner variants measured, the easy verdict is on the weaker of them (what the run really
    makes), not on the strongest single condition."""
    def s(cond: str, correct: float) -> C.Sample:
        return C.Sample(cond, 1, "count_color", "q", correct, 1.0)

    easy = [s("original", 1.0)] * 4 + [s("run_plan@1", 0.0)] * 3 + [s("run_plan@1", 1.0)] \
        + [s("run_plan@3", 1.0)] * 3 + [s("run_plan@3", 0.0)] + [s("rotate@1", 0.0)] * 4
    md = C.skew_report(tmp_path, {"easy": easy}, meta="hand-built")["md"].read_text()
    assert "run_plan@1 -75.0, run_plan@3 -25.0 points (the run's planner)" in md
    assert "strongest single condition rotate@1: -100.0 points; goal <= -15 on the weaker of the run planner " \
           "variants: met" in md
    easy[-8:-4] = [s("run_plan@3", 1.0)] * 4  # the weaker variant costs nothing now: not met, whatever rotation does
    md = C.skew_report(tmp_path, {"easy": easy}, meta="hand-built")["md"].read_text()
    assert "run_plan@3 +0.0" in md and "variants: NOT met" in md


def test_skew_conditions_follow_skewed_yaml() -> None:
    """The calibration's default planner settings are read from experiments/skewed.yaml (not copied into the tool)."""
    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "skewed.yaml").read_text())["data"]["init_args"]
    run = C.skewed_run()
    assert run.intensity_range == tuple(cfg["intensity_range"]) == (0.8, 1.0)
    assert run.image_ops == tuple(cfg["image_ops"]) and run.skew.hard_below == cfg["world"]["skew"]["hard_below"]
    conds = {c.name: c for c in C.skew_conditions("easy")}
    assert conds["run_plan@1"].plan_intensity == (0.8, 1.0) and conds["run_plan@1"].plan_ops == run.image_ops
    assert conds["plan@1"].plan_intensity is None and conds["plan@1"].plan_ops is None  # the planner's defaults
    default_plan = C.variant_spec(conds["plan@1"], 0, seed=0)
    assert default_plan is not None and default_plan.intensity == pytest.approx(0.6)
    # the run's planner at D = 1 perturbs with its own ops only, at the top of its range
    for i in range(20):
        spec = C.variant_spec(conds["run_plan@1"], i, seed=0)
        assert spec is not None and spec.kind == "image" and set(spec.image_ops) <= set(run.image_ops)
        assert spec.intensity == pytest.approx(1.0)
    with pytest.raises(ValueError, match="share"):
        C.skew_conditions("middle")


def test_skew_inputs_are_checked_and_the_goals_come_from_the_goals_file(tmp_path: Path) -> None:
    """A skewed config without the planner's settings, or a goals file with a wrong field, is an error naming the file
    and what is missing; the verdicts follow the goals handed in."""
    bad = tmp_path / "skewed.yaml"
    bad.write_text("data:\n  init_args:\n    intensity_range: [0.8, 1.0]\n")
    with pytest.raises(ValueError, match=r"skewed.yaml: missing \['data.init_args.image_ops', "
                                         r"'data.init_args.world.skew'\]"):
        C.skewed_run(bad)
    goals = C.load_goals()
    assert goals == C.SkewGoals(hard_p_below=0.1, easy_p_above=0.9, hint_gain=25.0, perturb_drop=-15.0)
    (tmp_path / "goals.yaml").write_text("hard_p_below: 0.1\nhint_gain: 25\n")
    with pytest.raises(ValueError, match="goals.yaml: needs exactly the fields"):
        C.load_goals(tmp_path / "goals.yaml")
    hard = [C.Sample("original", 1, "compare", "a", 0.0, 1.0), C.Sample("hint1", 1, "compare", "a", 1.0, 1.0)]
    strict = C.SkewGoals(hard_p_below=0.0, easy_p_above=0.9, hint_gain=200.0, perturb_drop=-15.0)
    md = C.skew_report(tmp_path, {"hard": hard}, meta="hand-built", goals=strict)["md"].read_text()
    assert "hard: p = 0.000 (goal < 0: NOT met); best hint hint1: +100.0 points on the same questions " \
           "(goal >= +200: NOT met)" in md


def test_skew_calibration_of_the_shipped_policy_runs_through_the_command(tmp_path: Path) -> None:
    """The real command on the shipped policy and table, a few questions: every condition of each share is asked."""
    C.main(["--skew", "--out", str(tmp_path), "--per_share", "2", "--samples", "1", "--max_new_tokens", "8"])
    with open(tmp_path / "calibration_skew.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["family"] == "all"]
    asked = {(r["share"], r["condition"]) for r in rows}
    assert {("hard", "original"), ("hard", "hint1"), ("easy", "original"), ("easy", "blank"), ("easy", "plan@1"),
            ("easy", "run_plan@1"), ("easy", "run_plan@3"), ("easy", "rotate@1"), ("easy", "noise@0.6")} <= asked
    # 2 questions x 1 sample for an unchanged question
    assert next(int(r["n"]) for r in rows if (r["share"], r["condition"]) == ("easy", "original")) == 2
    md = (tmp_path / "calibration_skew.md").read_text()
    assert "## Preconditions" in md and "(temperature 0.5," in md  # sampled at the table's temperature
