"""Write the sweep's tables and plots from a study (or from plain run folders).

Outputs in the sweep folder: `table2.md`/`table2.csv` (final and best val/accuracy, mean ± std over seeds, delta
to full), `efficiency.md`/`efficiency.csv` (steps and seconds to reach GRPO's best, ratio to GRPO), `report.md`
(both tables), and PNGs: `val_accuracy_vs_step.png`, `val_accuracy_vs_time.png`, `frac_reward_zero_std.png`,
`frac_family_zero_std.png`, `frac_zero_advantage.png`, `difficulty_hist_full.png`; report.md also has a
learning-signal table. On a skewed split (`data.world.skew`): `shares.md` (accuracy per share) with the efficiency
on the hard share (`efficiency_hard.csv`: steps, rollouts and seconds to GRPO's best hard-share accuracy) and a
validation-accuracy plot per share.

    python sweeps/report.py --storage journal:outputs/ablate/study.journal --study diva-ablate --out outputs/ablate

Statistics that do not exist print "n/a" (the std of one seed, a delta without the `full` row, a column a row never
logged); variant metrics are left blank for rows that train without variants (`num_variants: 0`, e.g. GRPO).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def write_report(runs: list[RunData], out_dir: str | Path) -> Path:
    """Tables + plots into out_dir; returns the path of report.md."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = write_tables(runs, out)
    pngs = write_plots(runs, out)
    lines = ["# DIVA-GRPO ablation (Table 2 form)", "", tables["table2"], "## Efficiency", "", tables["efficiency"]]
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
    p.add_argument("--storage", required=True, help="journal:<path> or an RDB URL (sqlite:/// too: reading only)")
    p.add_argument("--study", default="diva-ablate")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    # SQLite (earlier layout) is read as is; journal and RDB through the sweep's storage (patient on a lost database)
    storage = a.storage if a.storage.startswith("sqlite") else open_storage(a.storage)
    study = optuna.load_study(study_name=a.study, storage=storage)
    path = write_report(runs_from_study(study), a.out)
    from sweeps.missing import add_to_report  # the cells without a result, named at the top

    add_to_report(path, study)
    print(f"[report] wrote {path}")


if __name__ == "__main__":
    main()
