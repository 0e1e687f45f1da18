"""Write the sweep's tables and plots from a study (or from a runs folder kept without its study).

Headline first (issue 27, definitions in `sweeps/stats.py`): `replication.csv` and the report's first section give,
per row and validation metric (overall and each share), the final and best value as a mean with a 95% percentile
bootstrap interval over seeds, the worst seed, how many seeds collapse (final below the metric's fixed target,
`TARGETS` or --target), the normalised AUC up to a common rollout budget, the rollouts until each seed's smoothed
curve reaches the target (median, interval, seeds that reach it), and each row minus GRPO with the interval of the
difference; `per_seed.csv` / `per_seed.md` hold every seed's values and `seeds_<metric>.png` every seed's curve
with the mean's interval band. Then the earlier tables, kept for comparison:

Outputs in the sweep folder: `table2.md`/`table2.csv` (final and best val/accuracy, mean ± std over seeds, delta
to full), `efficiency.md`/`efficiency.csv` (steps and seconds to reach GRPO's best, ratio to GRPO), `report.md`
(both tables), and PNGs: `val_accuracy_vs_step.png`, `val_accuracy_vs_time.png`, `frac_reward_zero_std.png`,
`frac_family_zero_std.png`, `frac_zero_advantage.png`, `difficulty_hist_full.png`; report.md also has a
learning-signal table. On a skewed split (`data.world.skew`): `shares.md` (accuracy per share) with the efficiency
on the hard share (`efficiency_hard.csv`: steps, rollouts and seconds to GRPO's best hard-share accuracy) and a
validation-accuracy plot per share.

    python sweeps/report.py --storage journal:outputs/ablate/study.journal --study diva-ablate --out outputs/ablate
    python sweeps/report.py --runs docs/results/skewed/runs --out docs/results/skewed \
        --base val/accuracy=0.49 val/accuracy_hard=0 val/accuracy_easy=1 val/accuracy_middle=0.45

Statistics that do not exist print "n/a" (the std of one seed, a delta without the `full` row, a column a row never
logged); variant metrics are left blank for rows that train without variants (`num_variants: 0`, e.g. GRPO).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweeps import stats  # noqa: E402
from sweeps._common import BASELINE_ROW, FULL_ROW, ROWS  # noqa: E402
from sweeps.runlog import columns, read_metrics, series, val_curve, val_times  # noqa: E402
from sweeps.study import cell_of  # noqa: E402
from sweeps.tables import efficiency, fmt, mean_curve, mean_std, signed, table2  # noqa: E402


@dataclass
class RunData:
    """One finished cell's logs, reduced to what the report needs."""

    row: str
    seed: int
    metrics: list[dict[str, float]]
    variants: int | None = None  # data.init_args.num_variants of the run's resolved config (None: unknown)

    @property
    def curve(self) -> list[tuple[int, float]]:
        return val_curve(self.metrics)

    @classmethod
    def load(cls, row: str, seed: int, metrics_path: str | Path) -> RunData:
        """A run from its metrics.csv and the config.yaml the CLI wrote beside it."""
        config = Path(metrics_path).parent / "config.yaml"
        data = yaml.safe_load(config.read_text()).get("data", {}) if config.exists() else {}
        variants = (data.get("init_args") or {}).get("num_variants")
        return cls(row, seed, read_metrics(metrics_path), None if variants is None else int(variants))


def runs_from_study(study: object) -> list[RunData]:
    """The COMPLETE trials' runs (one per cell: the first complete trial wins)."""
    import optuna

    assert isinstance(study, optuna.Study)
    runs: dict[tuple[str, int], RunData] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        cell, path = cell_of(t), t.user_attrs.get("metrics_path")
        if cell is not None and (cell.row, cell.seed) not in runs and path and Path(path).exists():
            runs[(cell.row, cell.seed)] = RunData.load(cell.row, cell.seed, path)
    return [runs[k] for k in sorted(runs, key=lambda k: (list(ROWS).index(k[0]) if k[0] in ROWS else 99, k[1]))]


def runs_from_folder(folder: str | Path) -> list[RunData]:
    """The runs of a sweep's `runs/` folder: `<row>/seed<s>-t<n>/metrics.csv`, in the matrix's row order. Two
    attempts of one cell with metrics are an error naming both (the study knows which completed; a folder does
    not)."""
    runs: dict[tuple[str, int], Path] = {}
    for path in sorted(Path(folder).glob("*/seed*-t*/metrics.csv")):
        row, seed = path.parent.parent.name, int(path.parent.name.removeprefix("seed").split("-t")[0])
        if (row, seed) in runs:
            raise ValueError(f"{folder}: two runs of {row}/seed{seed}: {runs[(row, seed)].parent} and "
                             f"{path.parent}; move the failed attempt away")
        runs[(row, seed)] = path
    if not runs:
        raise ValueError(f"{folder}: no <row>/seed<s>-t<n>/metrics.csv under it")
    order = sorted(runs, key=lambda k: (list(ROWS).index(k[0]) if k[0] in ROWS else 99, k[1]))
    return [RunData.load(row, seed, runs[(row, seed)]) for row, seed in order]


def _csv(value: float | None) -> object:
    """A CSV cell: empty where the statistic does not exist."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _by_row(runs: list[RunData]) -> dict[str, list[RunData]]:
    out: dict[str, list[RunData]] = {}
    for r in runs:
        out.setdefault(r.row, []).append(r)
    return out


def write_tables(runs: list[RunData], out_dir: Path) -> dict[str, str]:
    """Table 2 and the efficiency table as Markdown and CSV; returns {name: markdown}."""
    by_row = _by_row(runs)
    summary = table2({row: [(rs.curve[-1][1], max(v for _, v in rs.curve)) for rs in rr if rs.curve]
                      for row, rr in by_row.items()}, full=FULL_ROW)
    md2 = ["| method | seeds | final val/accuracy | Δ final | best val/accuracy | Δ best |",
           "|---|---|---|---|---|---|"]
    with open(out_dir / "table2.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seeds", "final_mean", "final_std", "best_mean", "best_std", "delta_final", "delta_best"])
        for s in summary:
            w.writerow([s.row, s.seeds, *map(_csv, (s.final_mean, s.final_std, s.best_mean, s.best_std,
                                                     s.delta_final, s.delta_best))])
            md2.append(f"| {s.row} | {s.seeds} | {fmt(s.final_mean, s.final_std)} | {signed(s.delta_final)} | "
                       f"{fmt(s.best_mean, s.best_std)} | {signed(s.delta_best)} |")
    md_e = efficiency_lines(by_row, "val/accuracy", out_dir / "efficiency.csv")
    tables = {"table2": "\n".join(md2) + "\n", "efficiency": "\n".join(md_e) + "\n"}
    shares = share_table(runs)
    if shares:
        if any(series(r.metrics, "val/accuracy_hard") for r in runs):  # how fast each row learns the hard share
            shares += ("\n### Efficiency on the hard share\n\n"
                       + "\n".join(efficiency_lines(by_row, "val/accuracy_hard", out_dir / "efficiency_hard.csv"))
                       + "\n")
        tables["shares"] = shares
    for name, text in tables.items():
        (out_dir / f"{name}.md").write_text(text)
    return tables


def efficiency_lines(by_row: dict[str, list[RunData]], key: str, csv_path: Path) -> list[str]:
    """Markdown lines (and ``csv_path``) of the steps, rollouts and seconds each row needs to reach the GRPO row's
    best seed-mean of the validation metric ``key``, and their ratios to GRPO's."""
    target, eff = efficiency({row: [c for c in (_val_only(r, key) for r in rr) if c] for row, rr in by_row.items()},
                             {row: [val_times(r.metrics) for r in rr] for row, rr in by_row.items()},
                             baseline=BASELINE_ROW)
    # rollouts generated (dynamic sampling's dropped draws included) by the step each row first reaches the target
    rollouts = {e.row: _mean_at(by_row.get(e.row, []), "rollouts/generated", e.steps) for e in eff}
    base_rollouts = rollouts.get(BASELINE_ROW, math.nan)
    lines = [f"Target: the `{BASELINE_ROW}` row's best seed-mean {key} = {fmt(target)}.", "",
             "| method | steps to target | × GRPO steps | rollouts to target | × GRPO rollouts | seconds to target | "
             "× GRPO seconds |", "|---|---|---|---|---|---|---|"]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "target", "steps", "seconds", "step_ratio", "time_ratio", "rollouts", "rollout_ratio"])
        for e in eff:
            ratio = rollouts[e.row] / base_rollouts if base_rollouts else math.nan
            w.writerow([e.row, *map(_csv, (target, e.steps, e.seconds, e.step_ratio, e.time_ratio, rollouts[e.row],
                                           ratio))])
            lines.append(f"| {e.row} | {'not reached' if e.steps is None else e.steps} | {fmt(e.step_ratio, digits=2)}"
                         f" | {fmt(rollouts[e.row], digits=0)} | {fmt(ratio, digits=2)}"
                         f" | {fmt(e.seconds, digits=1)} | {fmt(e.time_ratio, digits=2)} |")
    return lines


def _mean_at(runs: list[RunData], key: str, step: int | None) -> float:
    """Mean over runs of `key` at `step` (nan when not reached or not logged)."""
    if step is None:
        return math.nan
    values = [v for r in runs if not math.isnan(v := dict(series(r.metrics, key)).get(step, math.nan))]
    return sum(values) / len(values) if values else math.nan


SHARE_KEYS = ("val/accuracy_hard", "val/accuracy_easy", "val/accuracy_middle")


def share_table(runs: list[RunData]) -> str:
    """Final and best validation accuracy on each share of a split composed by the difficulty skew (`data.skew`),
    mean ± std over seeds; empty when no run logged a share."""
    keys = [k for k in SHARE_KEYS if any(series(r.metrics, k) for r in runs)]
    if not keys:
        return ""
    head = " | ".join(f"final {k.split('_')[-1]} | best {k.split('_')[-1]}" for k in keys)
    lines = ["| method | seeds | " + head + " |", "|---|---|" + "---|---|" * len(keys)]
    for row, rr in _by_row(runs).items():
        cells = []
        for k in keys:
            curves = [c for c in (_val_only(r, k) for r in rr) if c]
            finals = [c[-1][1] for c in curves]
            bests = [max(v for _, v in c) for c in curves]
            cells += [fmt(*mean_std(finals)), fmt(*mean_std(bests))]
        lines.append(f"| {row} | {len(rr)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _val_only(run: RunData, key: str) -> list[tuple[int, float]]:
    """A validation metric's curve without the before-training validation (as `val_curve`)."""
    return series([r for r in run.metrics if math.isnan(r.get("val/before_training", math.nan))], key)


def write_plots(runs: list[RunData], out_dir: Path) -> list[Path]:
    """The four PNGs (mean line and ±std band over seeds per row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_row, written = _by_row(runs), []

    def band_plot(name: str, ylabel: str, xlabel: str, per_row: dict[str, list[list[tuple[int, float]]]]) -> None:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for row, curves in per_row.items():
            mc = mean_curve([c for c in curves if c])
            if not mc:
                continue
            xs, ms, ss = zip(*mc)
            ax.plot(xs, ms, marker="o", ms=3, label=row)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], alpha=0.15)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{ylabel} (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(out_dir / name)

    band_plot("val_accuracy_vs_step.png", "val/accuracy", "optimizer steps",
              {row: [r.curve for r in rr] for row, rr in by_row.items()})
    band_plot("frac_reward_zero_std.png", "frac_reward_zero_std", "optimizer steps",
              {row: [series(r.metrics, "frac_reward_zero_std") for r in rr] for row, rr in by_row.items()})
    # Per question (family) rather than per prompt: with equal rollout budgets a DIVA prompt group has G=5
    # responses and a GRPO one G=10, so the family rate is the like-for-like advantage-vanishing rate.
    band_plot("frac_family_zero_std.png", "frac_family_zero_std", "optimizer steps",
              {row: [series(r.metrics, "frac_family_zero_std") for r in rr] for row, rr in by_row.items()})
    # The advantage-vanishing rate itself: responses whose final advantage is exactly 0 (DIVA's global term keeps
    # a zero-spread prompt group's advantage alive when its family has spread).
    band_plot("frac_zero_advantage.png", "frac_zero_advantage", "optimizer steps",
              {row: [series(r.metrics, "frac_zero_advantage") for r in rr] for row, rr in by_row.items()})
    for key in SHARE_KEYS:  # a skewed split (data.skew): the hard and easy shares on their own
        if any(series(r.metrics, key) for r in runs):
            band_plot(f"{key.replace('/', '_')}_vs_step.png", key, "optimizer steps",
                      {row: [_val_only(r, key) for r in rr] for row, rr in by_row.items()})
    # Wall-clock: seconds differ per seed, so x is the seeds' mean time at each validated step.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, rr in by_row.items():
        mc, mt = mean_curve([r.curve for r in rr]), dict((s, m) for s, m, _ in mean_curve([val_times(r.metrics)
                                                                                           for r in rr]))
        pts = [(mt[s], m, sd) for s, m, sd in mc if s in mt]
        if pts:
            xs, ms, ss = zip(*pts)
            ax.plot(xs, ms, marker="o", ms=3, label=row)
            ax.fill_between(xs, [m - s for m, s in zip(ms, ss)], [m + s for m, s in zip(ms, ss)], alpha=0.15)
    ax.set(xlabel="wall-clock seconds since fit start", ylabel="val/accuracy", title="val/accuracy vs wall-clock")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "val_accuracy_vs_time.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "val_accuracy_vs_time.png")
    written.append(_difficulty_heatmap(plt, by_row.get(FULL_ROW, []), out_dir / "difficulty_hist_full.png"))
    return written


def _difficulty_heatmap(plt: object, runs: list[RunData], path: Path) -> Path:
    """Fraction of questions per unit difficulty bin (y) at each step (x), averaged over the full row's seeds."""
    fig, ax = plt.subplots(figsize=(7, 3.5))  # type: ignore[attr-defined]
    bins = sorted({c for r in runs for c in columns(r.metrics, "difficulty/hist_")},
                  key=lambda c: int(c.rsplit("_", 1)[1]))
    if bins:
        per_bin = [mean_curve([series(r.metrics, b) for r in runs]) for b in bins]
        steps = [s for s, _, _ in per_bin[0]]
        grid = [[m for _, m, _ in pb][: len(steps)] for pb in per_bin]
        im = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=(steps[0] - 0.5, steps[-1] + 0.5, 0.5, len(bins) + 0.5) if steps else None)
        ax.set_yticks(range(1, len(bins) + 1), [c.rsplit("_", 1)[1] for c in bins])
        fig.colorbar(im, ax=ax, label="fraction of questions")
    else:
        ax.text(0.5, 0.5, "no difficulty/hist_* columns (is the full row in the study?)", ha="center")
    ax.set(xlabel="optimizer steps", ylabel="difficulty bin", title="difficulty histogram over time (full)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # type: ignore[attr-defined]
    return path


# ---- Replication statistics (issue 27): per-seed values, bootstrap intervals, spread, per-seed efficiency --------

HEADLINE_KEYS = ("val/accuracy", *SHARE_KEYS)
# Fixed targets for "rollouts to target" and the collapse rule, set before the replication run (docs/skew.md,
# "Replication protocol"), not taken from another row's noisy best. Override with --target KEY=VALUE.
TARGETS: dict[str, float] = {"val/accuracy": 0.55, "val/accuracy_hard": 0.30}


@dataclass(frozen=True)
class Protocol:
    """How the replication tables are computed (sweeps/stats.py has the definitions).

    Attributes:
        targets: metric -> fixed target (rollouts to target; a seed whose final value is below it collapses).
        window: validations in the trailing moving average before "first reaches the target".
        base: metric -> the base policy's score, the curve's value at 0 rollouts for runs that did not validate
            before training (`ValidateBeforeTraining`); without either, the AUC window starts where every run has
            been validated once.
        resamples, level, rng_seed: the percentile bootstrap over seeds.
    """

    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))
    window: int = 3
    base: dict[str, float] = field(default_factory=dict)
    resamples: int = stats.RESAMPLES
    level: float = stats.LEVEL
    rng_seed: int = stats.RNG_SEED


def seed_curve(run: RunData, key: str, base: float | None = None) -> list[tuple[float, float]]:
    """(rollouts generated, value) at every validation of `key`; the before-training validation (or `base`) is the
    point at 0 rollouts. x falls back to optimizer steps only when the run never logged `rollouts/generated`
    (the report's header then says so)."""
    rollouts = dict(series(run.metrics, "rollouts/generated"))
    before = [r[key] for r in run.metrics if key in r and not math.isnan(r.get("val/before_training", math.nan))]
    trained = [(rollouts[step] if rollouts else float(step), value) for step, value in _val_only(run, key)]
    if not trained:
        return []
    return ([(0.0, before[-1])] if before else [] if base is None else [(0.0, base)]) + trained


@dataclass(frozen=True)
class SeedResult:
    """One seed's numbers on one metric (a row of per_seed.csv)."""

    row: str
    seed: int
    key: str
    final: float
    best: float
    auc: float
    to_target: float  # rollouts until the smoothed curve reaches the target; inf: not reached; nan: no target
    collapsed: bool | None  # final < target (None: no target for this metric)


def per_seed_results(runs: list[RunData],
                     protocol: Protocol) -> tuple[list[SeedResult], dict[str, tuple[float, float]]]:
    """Every (run, headline metric) as a SeedResult, and each metric's AUC window (start, budget): the budget is the
    smallest last-validated x over all runs (every run covers it), the start 0 when every run has a point there."""
    results, windows = [], {}
    for key in HEADLINE_KEYS:
        curves = {(r.row, r.seed): seed_curve(r, key, protocol.base.get(key)) for r in runs}
        curves = {k: c for k, c in curves.items() if c}
        if not curves:
            continue
        start = max(c[0][0] for c in curves.values())
        budget = min(c[-1][0] for c in curves.values())
        windows[key] = (start, budget)
        target = protocol.targets.get(key)
        for (row, seed), c in curves.items():
            trained = [(x, v) for x, v in c if x > 0]  # the validations after training started
            final, best = trained[-1][1], max(v for _, v in trained)
            auc = stats.normalised_auc(c, budget, start) if budget > start else math.nan
            to_target = math.nan if target is None else stats.rollouts_to_target(trained, target, protocol.window)
            results.append(SeedResult(row, seed, key, final, best, auc, to_target,
                                      None if target is None else final < target - 1e-12))
    return results, windows


def _ci(i: stats.Interval, digits: int = 3) -> str:
    """'0.390 [0.360, 0.420]', '0.400 [n/a]' (one seed), 'n/a'."""
    if math.isnan(i.estimate):
        return "n/a"
    low, high = (f"{v:.{digits}f}" if not math.isinf(v) else "not reached" for v in (i.low, i.high))
    text = f"{i.estimate:.{digits}f}" if not math.isinf(i.estimate) else "not reached"
    return f"{text} [n/a]" if math.isnan(i.low) else f"{text} [{low}, {high}]"


def _rollouts(x: float) -> str:
    return "n/a" if math.isnan(x) else "not reached" if math.isinf(x) else f"{x:,.0f}"


def replication_tables(runs: list[RunData], out_dir: Path, protocol: Protocol | None = None) -> str:
    """The headline statistics as Markdown (returned) and CSV: `replication.csv` (one line per row and metric) and
    `per_seed.csv` / `per_seed.md` (every seed's value). Empty when no run logged a validation metric."""
    protocol = protocol or Protocol()
    results, windows = per_seed_results(runs, protocol)
    if not results:
        return ""
    boot = {"resamples": protocol.resamples, "level": protocol.level, "rng_seed": protocol.rng_seed}
    x_name = "rollouts" if all(series(r.metrics, "rollouts/generated") for r in runs) else "optimizer steps"
    pct = f"{protocol.level:.0%}"
    lines = [f"Per seed, then over seeds: mean with a {pct} percentile-bootstrap interval over seeds "
             f"({protocol.resamples:,} resamples, RNG seed {protocol.rng_seed}; with few seeds it is too narrow, for "
             "normal data about 85% coverage with 5 seeds and 89% with 8: read it as a lower bound on the "
             "uncertainty). *Worst*: the lowest "
             "seed. *Collapsed*: seeds whose final value is below the metric's fixed target. *AUC*: the mean "
             f"value over the window of {x_name} shown (area under the seed's curve, linear between validations, "
             "divided by the window). *To target*: the " + x_name + " until the seed's curve, smoothed by a "
             f"trailing moving average of {protocol.window} validations (that one and the ones before it), first "
             "reaches the target; the row's "
             "median (a seed that never reaches it counts as infinite) and how many seeds reached it."
             + (" Curves of runs without a before-training validation start at the base policy's score given to "
                "the report (" + ", ".join(f"{k} {v:g}" for k, v in protocol.base.items()) + ")."
                if protocol.base else ""), ""]
    by_key: dict[str, dict[str, list[SeedResult]]] = {}
    for res in results:
        by_key.setdefault(res.key, {}).setdefault(res.row, []).append(res)
    csv_rows = []
    for key, rows in by_key.items():
        target = protocol.targets.get(key)
        start, budget = windows[key]
        head = f"### {key}" + (f" (fixed target {target:.2f})" if target is not None else "")
        lines += [head, "", f"| method | seeds | final | worst | collapsed | best | AUC {start:,.0f}-{budget:,.0f} "
                  f"{x_name} | {x_name} to target | reached |", "|---|---|---|---|---|---|---|---|---|"]
        for row, rr in rows.items():
            final = stats.spread([r.final for r in rr], floor=target, **boot)
            best = stats.bootstrap([r.best for r in rr], **boot)
            aucs = [r.auc for r in rr if not math.isnan(r.auc)]
            auc = stats.bootstrap(aucs, **boot)
            to = [r.to_target for r in rr if not math.isnan(r.to_target)]
            med = stats.bootstrap(to, statistic="median", **boot) if to else stats.Interval(*(math.nan,) * 3)
            reached = sum(not math.isinf(t) for t in to)
            lines.append(f"| {row} | {final.seeds} | {_ci(final.mean)} | {final.worst:.3f} | "
                         f"{f'{final.collapsed}/{final.seeds}' if target is not None else ''} | {_ci(best)} | "
                         f"{_ci(auc)} | {_median_ci(med)} | {f'{reached}/{len(to)}' if to else ''} |")
            csv_rows.append([row, key, final.seeds, final.mean.estimate, final.mean.low, final.mean.high,
                             final.worst, final.collapsed if target is not None else "", best.estimate, best.low,
                             best.high, start, budget, auc.estimate, auc.low, auc.high,
                             "" if target is None else target, med.estimate, med.low, med.high,
                             reached if to else ""])
        lines += ["", *difference_lines(rows, key, boot), ""]
    with open(out_dir / "replication.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "metric", "seeds", "final_mean", "final_low", "final_high", "worst", "collapsed",
                    "best_mean", "best_low", "best_high", "auc_start", "auc_budget", "auc_mean", "auc_low",
                    "auc_high", "target", "to_target_median", "to_target_low", "to_target_high", "reached"])
        w.writerows([[_csv(v) if isinstance(v, float) else v for v in r] for r in csv_rows])
    write_per_seed(results, out_dir)
    return "\n".join(lines) + "\n"


def _median_ci(i: stats.Interval) -> str:
    if math.isnan(i.estimate):
        return ""
    if math.isnan(i.low):
        return f"{_rollouts(i.estimate)} [n/a]"
    return f"{_rollouts(i.estimate)} [{_rollouts(i.low)}, {_rollouts(i.high)}]"


def difference_lines(rows: dict[str, list[SeedResult]], key: str, boot: dict[str, float]) -> list[str]:
    """Each row minus the baseline (GRPO) on the final value and the AUC, with the bootstrap interval of the
    difference (seeds of the two rows resampled independently); bold where the interval excludes 0."""
    base = rows.get(BASELINE_ROW)
    if not base:
        return []
    out = [f"| method − {BASELINE_ROW} ({key}) | Δ final | Δ AUC |", "|---|---|---|"]
    for row, rr in rows.items():
        if row == BASELINE_ROW:
            continue
        cells = []
        for attr in ("final", "auc"):
            a = [getattr(r, attr) for r in rr if not math.isnan(getattr(r, attr))]
            b = [getattr(r, attr) for r in base if not math.isnan(getattr(r, attr))]
            d = stats.bootstrap_difference(a, b, **boot)  # type: ignore[arg-type]
            text = "n/a" if math.isnan(d.estimate) else (
                f"{d.estimate:+.3f} [n/a]" if math.isnan(d.low) else f"{d.estimate:+.3f} [{d.low:+.3f}, {d.high:+.3f}]")
            cells.append(f"**{text}**" if d.excludes_zero() else text)
        out.append(f"| {row} | " + " | ".join(cells) + " |")
    return out


def write_per_seed(results: list[SeedResult], out_dir: Path) -> None:
    """`per_seed.csv` (one line per row, seed and metric) and `per_seed.md` (one line per row and seed: final and
    AUC on every metric, rollouts to target where a target is set)."""
    with open(out_dir / "per_seed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["row", "seed", "metric", "final", "best", "auc", "to_target", "collapsed"])
        for r in results:
            w.writerow([r.row, r.seed, r.key, r.final, r.best, _csv(r.auc),
                        "" if math.isnan(r.to_target) else "inf" if math.isinf(r.to_target) else r.to_target,
                        "" if r.collapsed is None else int(r.collapsed)])
    keys = list(dict.fromkeys(r.key for r in results))
    short = {k: k.removeprefix("val/accuracy").lstrip("_") or "overall" for k in keys}
    targeted = [k for k in keys if any(r.key == k and r.collapsed is not None for r in results)]
    head = ([f"final {short[k]}" for k in keys] + [f"AUC {short[k]}" for k in keys]
            + [f"to target {short[k]}" for k in targeted])
    lines = ["| method | seed | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    cell = {(r.row, r.seed, r.key): r for r in results}
    for row, seed in dict.fromkeys((r.row, r.seed) for r in results):
        got = [cell.get((row, seed, k)) for k in keys]
        values = ([f"{g.final:.3f}" if g else "" for g in got] + [fmt(g.auc) if g else "" for g in got]
                  + [_rollouts(cell[(row, seed, k)].to_target) if (row, seed, k) in cell else "" for k in targeted])
        lines.append(f"| {row} | {seed} | " + " | ".join(values) + " |")
    (out_dir / "per_seed.md").write_text("\n".join(lines) + "\n")


def write_seed_plots(runs: list[RunData], out_dir: Path, protocol: Protocol | None = None) -> list[Path]:
    """`seeds_<metric>.png` for the metrics with a target: one panel per row, each seed's curve (thin), the
    seed mean (thick) with its pointwise bootstrap interval (band, at the validations every seed has) and the
    target (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocol = protocol or Protocol()
    by_row, written = _by_row(runs), []
    boot = {"resamples": protocol.resamples, "level": protocol.level, "rng_seed": protocol.rng_seed}
    for key, target in protocol.targets.items():
        curves = {row: [c for c in (seed_curve(r, key, protocol.base.get(key)) for r in rr) if c]
                  for row, rr in by_row.items()}
        curves = {row: cs for row, cs in curves.items() if cs}
        if not curves:
            continue
        budget = min(c[-1][0] for cs in curves.values() for c in cs)  # the AUC's budget (per_seed_results)
        cols = min(4, len(curves))
        nrows = math.ceil(len(curves) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), sharey=True, squeeze=False)
        for ax, (row, cs) in zip(axes.flat, curves.items()):
            for c in cs:
                ax.plot(*zip(*c), lw=0.8, alpha=0.5, color="tab:gray")
            n = min(len(c) for c in cs)  # validations every seed has (same cadence: the first n)
            xs = [sum(c[i][0] for c in cs) / len(cs) for i in range(n)]
            cis = [stats.bootstrap([c[i][1] for c in cs], **boot) for i in range(n)]
            ax.plot(xs, [i.estimate for i in cis], lw=2, color="tab:blue", label=f"mean of {len(cs)} seeds")
            if len(cs) > 1:
                ax.fill_between(xs, [i.low for i in cis], [i.high for i in cis], alpha=0.25, color="tab:blue",
                                label=f"{protocol.level:.0%} bootstrap interval")
            ax.axhline(target, ls="--", lw=1, color="tab:red", label=f"target {target:.2f}")
            ax.axvline(budget, ls=":", lw=1, color="black", label=f"AUC budget {budget:,.0f}")
            ax.set_title(row, fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(curves):]:
            ax.axis("off")
        axes[0][0].legend(fontsize=6, loc="lower right")
        fig.supxlabel("rollouts generated" if all(series(r.metrics, "rollouts/generated") for r in runs)
                      else "optimizer steps (rollouts/generated not logged)", fontsize=9)
        fig.supylabel(key, fontsize=9)
        fig.suptitle(f"{key}: every seed, the mean and its interval", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"seeds_{key.replace('/', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


VARIANT_COLUMNS = ("variant_rescue_rate", "frac_reward_zero_std/paraphrase", "frac_reward_zero_std/image",
                   "frac_reward_zero_std/hint")  # meaningless without variants: blank for such rows
SIGNAL_COLUMNS = ("frac_reward_zero_std", "frac_family_zero_std", "frac_zero_advantage", "variant_rescue_rate",
                  "tier/easy/count", "tier/medium/count", "tier/hard/count")
# Where the zero-spread local groups come from: by the kind of prompt, and by the question's tier.
ZERO_SPREAD_COLUMNS = ("frac_reward_zero_std/original", "frac_reward_zero_std/paraphrase",
                       "frac_reward_zero_std/image", "frac_reward_zero_std/hint", "tier/easy/frac_zero_std",
                       "tier/medium/frac_zero_std", "tier/hard/frac_zero_std")


def signal_table(runs: list[RunData], columns: tuple[str, ...] = SIGNAL_COLUMNS) -> str:
    """Markdown: per row, the mean over all logged steps and seeds of the given columns (n/a if never logged; blank
    for a variant metric of a row whose runs have no variants).

    Tier counts are responses per step (to originals and variants); a row whose prompts never leave the medium tier
    has not engaged DIVA's difficulty loop.
    """
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, rr in _by_row(runs).items():
        cells = []
        without_variants = all(r.variants == 0 for r in rr)
        for col in columns:
            values = [v for r in rr for _, v in series(r.metrics, col)]
            if without_variants and col in VARIANT_COLUMNS:
                cells.append("")
            else:
                cells.append(f"{sum(values) / len(values):.3f}" if values else "n/a")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


DYNAMIC_COLUMNS = ("dynamic_sampling/frac_spread_units", "dynamic_sampling/draws",
                   "dynamic_sampling/generated_rollouts", "dynamic_sampling/kept_rollouts")


def dynamic_table(runs: list[RunData]) -> str:
    """Markdown for the rows with dynamic sampling: what the filter saw before it dropped the zero-spread groups
    (their learning-signal columns are measured after it, so they read 0). Empty when no row samples dynamically."""
    rows = {row: rr for row, rr in _by_row(runs).items()
            if any(series(r.metrics, DYNAMIC_COLUMNS[0]) for r in rr)}
    if not rows:
        return ""
    lines = ["| method | zero-spread before the filter | draws per step | rollouts generated per step | "
             "rollouts kept per step |", "|---|---|---|---|---|"]
    for row, rr in rows.items():
        means = []
        for col in DYNAMIC_COLUMNS:
            values = [v for r in rr for _, v in series(r.metrics, col)]
            means.append(sum(values) / len(values) if values else math.nan)
        lines.append(f"| {row} | {1 - means[0]:.3f} | {means[1]:.2f} | {means[2]:.1f} | {means[3]:.1f} |")
    return "\n".join(lines) + "\n"


def write_report(runs: list[RunData], out_dir: str | Path, protocol: Protocol | None = None) -> Path:
    """Tables + plots into out_dir; returns the path of report.md. The replication statistics (per seed, with
    intervals) come first: they are the headline; Table 2's mean ± std and the seed-mean crossing follow."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    replication = replication_tables(runs, out, protocol)
    tables = write_tables(runs, out)
    pngs = write_seed_plots(runs, out, protocol) + write_plots(runs, out)
    lines = ["# DIVA-GRPO ablation (Table 2 form)", ""]
    if replication:
        lines += ["## Replication statistics (headline: per seed, with intervals over seeds)", "", replication,
                  "Every seed's values: `per_seed.md` / `per_seed.csv`; this table as CSV: `replication.csv`.", ""]
    lines += ["## Table 2 (mean ± sample std over seeds)", "", tables["table2"],
              "## Efficiency of the seed-mean curve (kept for comparison: one crossing of a noisy mean curve, "
              "quantised by the validation interval; the per-seed measures above replace it)", "",
              tables["efficiency"]]
    if "shares" in tables:
        lines += ["## Validation accuracy by share of the skewed split (hard: base p < 0.1, easy: p > 0.9)", "",
                  tables["shares"]]
    lines += ["## Learning signal (mean over steps and seeds)", "", signal_table(runs),
              "## Zero-spread local groups by prompt kind and question tier (mean over steps and seeds)", "",
              signal_table(runs, ZERO_SPREAD_COLUMNS)]
    if dynamic := dynamic_table(runs):
        lines += ["## Dynamic sampling: what the filter saw (the rows above are measured after it)", "", dynamic]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def main(argv: list[str] | None = None) -> None:
    import optuna

    from sweeps.study import open_storage

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--storage", help="journal:<path> or an RDB URL (sqlite:/// too: reading only)")
    source.add_argument("--runs", help="a sweep's runs folder (<row>/seed<s>-t<n>/metrics.csv), e.g. a results "
                        "folder kept without its study")
    p.add_argument("--study", default="diva-ablate")
    p.add_argument("--out", required=True)
    p.add_argument("--target", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"fixed target per metric (rollouts to target, collapse rule); default {TARGETS}")
    p.add_argument("--base", nargs="*", default=[], metavar="KEY=VALUE",
                   help="the base policy's score per metric: each curve's point at 0 rollouts for runs that did "
                   "not validate before training")
    p.add_argument("--window", type=int, default=3, help="validations in the smoothing before 'reaches the target'")
    a = p.parse_args(argv)
    protocol = Protocol(targets={**TARGETS, **parse_pairs(a.target, "--target")}, window=a.window,
                        base=parse_pairs(a.base, "--base"))
    if a.runs:
        print(f"[report] wrote {write_report(runs_from_folder(a.runs), a.out, protocol)}")
        return
    # SQLite (earlier layout) is read as is; journal and RDB through the sweep's storage (patient on a lost database)
    storage = a.storage if a.storage.startswith("sqlite") else open_storage(a.storage)
    study = optuna.load_study(study_name=a.study, storage=storage)
    path = write_report(runs_from_study(study), a.out, protocol)
    from sweeps.missing import add_to_report  # the cells without a result, named at the top

    add_to_report(path, study)
    print(f"[report] wrote {path}")


def parse_pairs(pairs: list[str], flag: str) -> dict[str, float]:
    """['val/accuracy_hard=0.3', ...] -> {'val/accuracy_hard': 0.3}; a malformed pair is an error naming it."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key:
            raise SystemExit(f"{flag}: expected KEY=VALUE with a number, got {pair!r}")
    return out


if __name__ == "__main__":
    main()
