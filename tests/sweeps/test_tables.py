"""The report's math by hand, and the report written from synthetic Lightning-style metrics.csv files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from sweeps.report import RunData, dynamic_table, signal_table, write_report
from sweeps.runlog import read_metrics, series, val_curve, val_times
from sweeps.tables import efficiency, first_reach, fmt, mean_curve, mean_std, signed, table2


def test_mean_std_is_sample_std() -> None:
    # [0.2, 0.3, 0.4]: mean 0.3, squared deviations 0.01 + 0 + 0.01 = 0.02, / (3 - 1) = 0.01, sqrt = 0.1
    m, s = mean_std([0.2, 0.3, 0.4])
    assert m == pytest.approx(0.3) and s == pytest.approx(0.1)
    m, s = mean_std([0.7])  # one seed: a mean, but no spread to estimate
    assert m == 0.7 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_std([]))


def test_fmt_says_na_where_a_statistic_does_not_exist() -> None:
    assert fmt(0.4312, 0.0123) == "0.431 ± 0.012"
    assert fmt(*mean_std([0.4312])) == "0.431 ± n/a"  # one seed: no "± 0.000"
    assert fmt(0.5) == "0.500" and fmt(math.nan) == "n/a" and signed(math.nan) == "n/a"


def test_table2_means_stds_and_deltas_to_full() -> None:
    rows = table2({"full": [(0.4, 0.5), (0.6, 0.7)], "grpo": [(0.2, 0.3), (0.3, 0.3), (0.4, 0.6)]})
    full, grpo = rows
    # full finals 0.4, 0.6: mean 0.5, std sqrt((0.01 + 0.01) / 1) = 0.1414
    assert (full.final_mean, full.best_mean) == pytest.approx((0.5, 0.6))
    assert full.final_std == pytest.approx(math.sqrt(0.02))
    assert (full.delta_final, full.delta_best) == (0.0, 0.0)
    # grpo finals mean 0.3 -> delta -0.2; bests 0.3, 0.3, 0.6: mean 0.4 -> delta -0.2
    assert grpo.seeds == 3
    assert (grpo.delta_final, grpo.delta_best) == pytest.approx((-0.2, -0.2))
    assert math.isnan(table2({"grpo": [(0.1, 0.2)]})[0].delta_final)  # no full row: no delta


def test_mean_curve_and_first_reach() -> None:
    a, b = [(10, 0.1), (20, 0.3), (30, 0.2)], [(10, 0.3), (20, 0.3)]
    mc = mean_curve([a, b])  # step 30 only in one seed: cut
    assert [(s, round(m, 6)) for s, m, _ in mc] == [(10, 0.2), (20, 0.3)]
    assert first_reach([(10, 0.2), (20, 0.3), (30, 0.5)], 0.3) == 20
    assert first_reach([(10, 0.2)], 0.3) is None


def test_efficiency_steps_seconds_and_ratios() -> None:
    curves = {
        # grpo seed means: 0.2, 0.3, 0.3 -> target 0.3, first reached at step 20
        "grpo": [[(10, 0.1), (20, 0.3), (30, 0.2)], [(10, 0.3), (20, 0.3), (30, 0.4)]],
        # full seed means: 0.3 at step 10 -> reaches the target at 10
        "full": [[(10, 0.2), (20, 0.5), (30, 0.5)], [(10, 0.4), (20, 0.5), (30, 0.6)]],
        "no_rrb": [[(10, 0.1), (20, 0.2)]],
    }
    times = {"grpo": [[(20, 10.0)], [(20, 14.0)]], "full": [[(10, 5.0)], [(10, 7.0)]], "no_rrb": [[(10, 1.0)]]}
    target, rows = efficiency(curves, times)
    by = {r.row: r for r in rows}
    assert target == pytest.approx(0.3)
    assert (by["grpo"].steps, by["grpo"].seconds) == (20, pytest.approx(12.0))
    assert (by["full"].steps, by["full"].seconds) == (10, pytest.approx(6.0))  # (5 + 7) / 2
    assert (by["full"].step_ratio, by["full"].time_ratio) == pytest.approx((0.5, 0.5))
    assert by["no_rrb"].steps is None and math.isnan(by["no_rrb"].step_ratio)


def _write_metrics(path: Path, val: list[float], zero_std: list[float], hist: bool, every: int = 2) -> None:
    """A Lightning-CSVLogger-shaped file: one train row per step, a val row after every `every` steps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["step", "frac_reward_zero_std", "time/elapsed_s", "val/accuracy", "val/elapsed_s"]
    cols += ["difficulty/hist_4", "difficulty/hist_5"] if hist else []
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for i, z in enumerate(zero_std):
            row = {"step": i, "frac_reward_zero_std": z, "time/elapsed_s": 1.5 * (i + 1)}
            if hist:
                row |= {"difficulty/hist_4": i / 10, "difficulty/hist_5": 1 - i / 10}
            w.writerow(row)
            if (i + 1) % every == 0:
                w.writerow({"step": i, "val/accuracy": val[(i + 1) // every - 1], "val/elapsed_s": 1.5 * (i + 1) + 0.5})


def test_runlog_reads_steps_done(tmp_path: Path) -> None:
    _write_metrics(tmp_path / "m.csv", [0.25, 0.5], [1.0, 0.5, 0.5, 0.0], hist=False)
    rows = read_metrics(tmp_path / "m.csv")
    assert val_curve(rows) == [(2, 0.25), (4, 0.5)]  # Lightning's step 1 = two steps done
    assert val_times(rows) == [(2, 3.5), (4, 6.5)]
    assert series(rows, "frac_reward_zero_std") == [(1, 1.0), (2, 0.5), (3, 0.5), (4, 0.0)]
    # ValidateAfterTraining's validation is logged at the steps done (4 here, after the training row at step 3)
    after = rows + [{"step": 4.0, "val/accuracy": 0.75, "val/after_training": 1.0, "val/elapsed_s": 8.0}]
    assert val_curve(after) == [(2, 0.25), (4, 0.75)] and val_times(after) == [(2, 3.5), (4, 8.0)]


def test_report_tables_and_plots(tmp_path: Path) -> None:
    runs = []
    for row, vals in {"full": [[0.2, 0.6], [0.4, 0.8]], "grpo": [[0.2, 0.4], [0.2, 0.2]]}.items():
        for seed, v in enumerate(vals):
            p = tmp_path / "runs" / row / f"{seed}.csv"
            _write_metrics(p, v, [0.5, 0.5, 0.25, 0.25], hist=row == "full")
            runs.append(RunData(row, seed, read_metrics(p)))
    report = write_report(runs, tmp_path / "out")
    with open(tmp_path / "out" / "table2.csv") as f:
        t2 = {r["row"]: r for r in csv.DictReader(f)}
    # full finals 0.6, 0.8 -> 0.7; grpo finals 0.4, 0.2 -> 0.3; delta -0.4
    assert float(t2["full"]["final_mean"]) == pytest.approx(0.7)
    assert float(t2["grpo"]["delta_final"]) == pytest.approx(-0.4)
    assert float(t2["grpo"]["best_mean"]) == pytest.approx(0.3)  # bests 0.4, 0.2
    with open(tmp_path / "out" / "efficiency.csv") as f:
        eff = {r["row"]: r for r in csv.DictReader(f)}
    # grpo mean curve 0.2, 0.3 -> target 0.3 at step 4; full mean curve 0.3 at step 2 (seconds (3.5 + 3.5) / 2)
    assert (eff["grpo"]["steps"], eff["full"]["steps"]) == ("4", "2")
    assert float(eff["full"]["seconds"]) == pytest.approx(3.5)
    assert float(eff["full"]["step_ratio"]) == pytest.approx(0.5)
    text = report.read_text()
    assert "| full | 2 | 0.700 ± 0.141 | +0.000 |" in text
    # zero-spread means over 4 steps x 2 seeds: (0.5 + 0.5 + 0.25 + 0.25) / 4; unlogged columns say "n/a"
    assert signal_table(runs, ("frac_reward_zero_std", "frac_reward_zero_std/hint")).splitlines()[2] == (
        "| full | 0.375 | n/a |")
    assert "## Zero-spread local groups by prompt kind" in text
    import matplotlib.image as mpimg

    for name in ("val_accuracy_vs_step", "val_accuracy_vs_time", "frac_reward_zero_std", "difficulty_hist_full"):
        img = mpimg.imread(tmp_path / "out" / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0  # a real, non-blank picture


def test_one_seed_prints_na_and_rows_without_variants_leave_variant_metrics_blank(tmp_path: Path) -> None:
    runs = []
    for row, variants in (("full", 1), ("grpo", 0)):
        p = tmp_path / "runs" / row / "metrics.csv"
        _write_metrics(p, [0.2, 0.4], [0.5, 0.5, 0.25, 0.25], hist=False)
        (p.parent / "config.yaml").write_text(f"data:\n  init_args:\n    num_variants: {variants}\n")
        runs.append(RunData.load(row, 0, p))
    assert [r.variants for r in runs] == [1, 0]
    for r in runs:  # the monitor logs a rescue rate of 0 on GRPO too: meaningless there
        for m in r.metrics:
            m["variant_rescue_rate"] = 0.0
    text = write_report(runs, tmp_path / "out").read_text()
    assert "| full | 1 | 0.400 ± n/a | +0.000 | 0.400 ± n/a | +0.000 |" in text and "± 0.000" not in text
    table = signal_table(runs, ("frac_reward_zero_std", "variant_rescue_rate")).splitlines()
    assert table[2:] == ["| full | 0.375 | 0.000 |", "| grpo | 0.375 |  |"]
    with open(tmp_path / "out" / "table2.csv") as f:
        assert next(csv.DictReader(f))["final_std"] == ""  # absent, not 0 and not "nan"


def test_rollouts_to_target_and_the_share_table(tmp_path: Path) -> None:
    """Rollouts counted as generated (dynamic sampling draws more per step) and the skewed split's shares."""
    runs = []
    for row, vals, per_step in (("full", [0.4, 0.6], 80), ("grpo", [0.2, 0.4], 80), ("dapo", [0.4, 0.5], 200)):
        p = tmp_path / "runs" / row / "metrics.csv"
        _write_metrics(p, vals, [0.5, 0.5, 0.25, 0.25], hist=False)
        rows = read_metrics(p)
        for r in rows:
            if "frac_reward_zero_std" in r:
                r["rollouts/generated"] = per_step * (int(r["step"]) + 1)
            if "val/accuracy" in r:
                r["val/accuracy_hard"] = r["val/accuracy"] / 2
                r["val/accuracy_easy"] = 1.0 - r["val/accuracy"] / 4
        runs.append(RunData(row, 0, rows))
    text = write_report(runs, tmp_path / "out").read_text()
    with open(tmp_path / "out" / "efficiency.csv") as f:
        eff = {r["row"]: r for r in csv.DictReader(f)}
    # target = grpo's best 0.4, reached at step 4 (320 rollouts); full and dapo reach it at step 2: 160 and 400
    assert [float(eff[r]["rollouts"]) for r in ("grpo", "full", "dapo")] == [320.0, 160.0, 400.0]
    assert float(eff["full"]["rollout_ratio"]) == pytest.approx(0.5)
    assert float(eff["dapo"]["rollout_ratio"]) == pytest.approx(1.25)
    assert "| full | 1 | 0.300 ± n/a | 0.300 ± n/a | 0.850 ± n/a | 0.900 ± n/a |" in text  # hard final/best, easy
    # the same on the hard share: grpo's best hard 0.2 (step 4, 320 rollouts); full and dapo reach it at step 2
    assert "### Efficiency on the hard share" in text and "best seed-mean val/accuracy_hard = 0.200" in text
    with open(tmp_path / "out" / "efficiency_hard.csv") as f:
        hard = {r["row"]: r for r in csv.DictReader(f)}
    assert [float(hard[r]["rollouts"]) for r in ("grpo", "full", "dapo")] == [320.0, 160.0, 400.0]
    assert float(hard["full"]["step_ratio"]) == pytest.approx(0.5) and float(hard["grpo"]["target"]) == 0.2
    assert (tmp_path / "out" / "val_accuracy_hard_vs_step.png").is_file()


def test_dynamic_sampling_rows_report_what_the_filter_saw() -> None:
    """A DAPO row's learning-signal columns are measured after its filter (0): the report adds the rate before it."""
    def step(s: int, spread: float, draws: int) -> dict[str, float]:
        return {"step": float(s), "dynamic_sampling/frac_spread_units": spread, "dynamic_sampling/draws": draws,
                "dynamic_sampling/generated_rollouts": 80.0 * draws, "dynamic_sampling/kept_rollouts": 80.0,
                "frac_reward_zero_std": 0.0}
    dapo = [RunData("dapo", 0, [step(0, 0.5, 2), step(1, 0.7, 1)]), RunData("dapo", 1, [step(0, 0.6, 3)])]
    grpo = [RunData("grpo", 0, [{"step": 0.0, "frac_reward_zero_std": 0.4}])]
    assert dynamic_table(grpo) == ""
    text = dynamic_table(grpo + dapo)
    # mean spread over all steps and seeds (0.5 + 0.7 + 0.6) / 3 = 0.6 -> zero-spread 0.400; draws 2.00; 160 / 80
    assert "| dapo | 0.400 | 2.00 | 160.0 | 80.0 |" in text and "grpo" not in text
