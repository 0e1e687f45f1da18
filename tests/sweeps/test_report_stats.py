"""The report's replication statistics (issue 27) on hand-made Lightning-style metrics: per-seed values, AUC,
rollouts to target, collapse, differences to GRPO with intervals, the per-seed files, the plot and the CLI."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from sweeps.report import (
    Protocol,
    RunData,
    main,
    per_seed_results,
    runs_from_folder,
    seed_curve,
    write_report,
)
from sweeps.runlog import read_metrics

Row = dict[str, float]


def _metrics(hard: list[float], overall: list[float], *, before: tuple[float, float] | None = (0.0, 0.5),
             per_step: int = 80, every: int = 2) -> list[Row]:
    """Rows as Lightning's CSVLogger writes them: a training row per step (cumulative `rollouts/generated`), a
    validation row after every `every` steps (Lightning's step = steps done - 1), and optionally the
    before-training validation at step 0 marked `val/before_training`."""
    rows: list[Row] = []
    if before is not None:
        rows.append({"step": 0.0, "val/accuracy_hard": before[0], "val/accuracy": before[1],
                     "val/before_training": 1.0})
    for i in range(every * len(hard)):
        rows.append({"step": float(i), "rollouts/generated": float(per_step * (i + 1))})
        if (i + 1) % every == 0:
            k = (i + 1) // every - 1
            rows.append({"step": float(i), "val/accuracy_hard": hard[k], "val/accuracy": overall[k]})
    return rows


def _runs() -> list[RunData]:
    # hard share, validated after 2 and 4 steps = 160 and 320 rollouts, base 0.0 at 0 rollouts
    return [RunData("full", 0, _metrics([0.2, 0.4], [0.5, 0.6])), RunData("full", 1, _metrics([0.4, 0.6], [0.6, 0.6])),
            RunData("grpo", 0, _metrics([0.0, 0.2], [0.5, 0.5])), RunData("grpo", 1, _metrics([0.2, 0.2], [0.5, 0.6]))]


def test_per_seed_values_by_hand() -> None:
    results, windows = per_seed_results(_runs(), Protocol(targets={"val/accuracy_hard": 0.3}))
    hard = {(r.row, r.seed): r for r in results if r.key == "val/accuracy_hard"}
    assert windows["val/accuracy_hard"] == (0.0, 320.0)  # every run starts at 0 and ends at 320
    # full seed 0: (0, 0) (160, 0.2) (320, 0.4): area 160 x 0.1 + 160 x 0.3 = 64, / 320 = 0.2
    assert hard[("full", 0)].auc == pytest.approx(0.2)
    # full seed 1: 160 x 0.2 + 160 x 0.5 = 112 -> 0.35; grpo: 16 / 320 = 0.05 and (16 + 32) / 320 = 0.15
    assert [hard[k].auc for k in (("full", 1), ("grpo", 0), ("grpo", 1))] == pytest.approx([0.35, 0.05, 0.15])
    # trailing smoothing of the two trained validations: full seed 0 0.2, 0.3 reaches 0.3 at the second (320
    # rollouts), seed 1 0.4, 0.5 at the first (160); grpo 0.0, 0.1 and 0.2, 0.2 never do
    assert [hard[k].to_target for k in (("full", 0), ("full", 1))] == [320.0, 160.0]
    assert [hard[k].to_target for k in (("grpo", 0), ("grpo", 1))] == [math.inf, math.inf]
    assert [hard[k].collapsed for k in sorted(hard)] == [False, False, True, True]  # finals 0.4 0.6 | 0.2 0.2
    assert (hard[("full", 1)].final, hard[("full", 1)].best) == (0.6, 0.6)
    overall = next(r for r in results if r.key == "val/accuracy" and r.row == "full")
    assert overall.collapsed is None and math.isnan(overall.to_target)  # no target given for val/accuracy


def test_report_writes_intervals_differences_and_per_seed_files(tmp_path: Path) -> None:
    text = write_report(_runs(), tmp_path, Protocol(targets={"val/accuracy_hard": 0.3})).read_text()
    with open(tmp_path / "replication.csv") as f:
        rep = {(r["row"], r["metric"]): r for r in csv.DictReader(f)}
    full = rep[("full", "val/accuracy_hard")]
    # finals 0.4, 0.6: resampled means 0.4, 0.5, 0.6 -> 95% interval [0.4, 0.6]
    assert [float(full[k]) for k in ("final_mean", "final_low", "final_high", "worst")] == pytest.approx(
        [0.5, 0.4, 0.6, 0.4])
    assert (full["collapsed"], full["reached"], float(full["to_target_median"])) == ("0", "2", 240.0)
    grpo = rep[("grpo", "val/accuracy_hard")]
    assert (grpo["collapsed"], grpo["reached"], grpo["to_target_median"]) == ("2", "0", "inf")
    assert float(grpo["auc_mean"]) == pytest.approx(0.1)
    assert "| full | 2 | 0.500 [0.400, 0.600] | 0.400 | 0/2 |" in text
    # full - grpo on the final hard share: 0.5 - 0.2; grpo's finals are both 0.2, so the interval is full's
    # shifted: [0.2, 0.4], which excludes 0 (bold)
    assert "| full | **+0.300 [+0.200, +0.400]** |" in text
    with open(tmp_path / "per_seed.csv") as f:
        per_seed = list(csv.DictReader(f))
    assert len(per_seed) == 8  # 4 runs x 2 metrics
    assert {r["to_target"] for r in per_seed if r["row"] == "grpo" and r["metric"] == "val/accuracy_hard"} == {"inf"}
    lines = (tmp_path / "per_seed.md").read_text().splitlines()
    assert lines[0] == "| method | seed | final overall | final hard | AUC overall | AUC hard | to target hard |"
    # overall AUC of full seed 0: (0, 0.5) (160, 0.5) (320, 0.6): (160 x 0.5 + 160 x 0.55) / 320 = 0.525
    assert lines[2] == "| full | 0 | 0.600 | 0.400 | 0.525 | 0.200 | 320 |"
    import matplotlib.image as mpimg

    img = mpimg.imread(tmp_path / "seeds_val_accuracy_hard.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0


def test_base_score_anchors_runs_that_did_not_validate_before_training() -> None:
    run = RunData("full", 9, _metrics([0.2, 0.4], [0.5, 0.6], before=None))
    assert seed_curve(run, "val/accuracy_hard") == [(160.0, 0.2), (320.0, 0.4)]
    assert seed_curve(run, "val/accuracy_hard", base=0.0) == [(0.0, 0.0), (160.0, 0.2), (320.0, 0.4)]
    assert seed_curve(run, "val/accuracy_easy", base=1.0) == []  # never logged: no curve, even with a base
    # Without an anchor, the AUC window starts where every run has been validated once.
    _, windows = per_seed_results([run, *_runs()], Protocol())
    assert windows["val/accuracy_hard"] == (160.0, 320.0)


def _write(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, names)
        w.writeheader()
        w.writerows(rows)


def test_report_from_a_runs_folder_by_the_command_line(tmp_path: Path) -> None:
    for run in reversed(_runs()):  # written in reverse: the report orders rows as the matrix does; without the
        # before-training validation (as docs/results/skewed/), so --base anchors the curves
        _write(tmp_path / "runs" / run.row / f"seed{run.seed}-t{run.seed + 3}" / "metrics.csv",
               [r for r in run.metrics if "val/before_training" not in r])
    runs = runs_from_folder(tmp_path / "runs")
    assert [(r.row, r.seed) for r in runs] == [("full", 0), ("full", 1), ("grpo", 0), ("grpo", 1)]
    assert "val/before_training" not in read_metrics(tmp_path / "runs/full/seed0-t3/metrics.csv")[0]
    main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--target", "val/accuracy_hard=0.45",
          "--base", "val/accuracy_hard=0", "val/accuracy=0.5"])
    with open(tmp_path / "out" / "replication.csv") as f:
        rep = {(r["row"], r["metric"]): r for r in csv.DictReader(f)}
    # target 0.45: full's smoothed hard curves end at 0.3 and 0.5 -> one seed reaches it; the base anchors the
    # window at 0
    assert (rep[("full", "val/accuracy_hard")]["reached"], rep[("full", "val/accuracy_hard")]["auc_start"]) == (
        "1", "0.0")
    assert rep[("full", "val/accuracy")]["target"] == "0.55"  # the default target stays for the other metric
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--target", "val/accuracy_hard"])
    (tmp_path / "runs/full/seed0-t9").mkdir()
    (tmp_path / "runs/full/seed0-t9/metrics.csv").write_text("step\n")
    with pytest.raises(ValueError, match="two runs of full/seed0"):
        runs_from_folder(tmp_path / "runs")
