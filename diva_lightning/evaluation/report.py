"""Table 1 of the paper, for our runs: one headline number per benchmark, the base policy as a comparison row.

``table1_report(results, out_dir, baseline)`` writes ``table1.md`` (the table, the protocol note, and every
metric), ``table1.csv`` (long form: model, benchmark, metric, value) and ``table1.png`` (a grouped bar chart
of the headline numbers). Values are percentages. The headline is each benchmark's ``headline`` metric
(``accuracy``; WeMath's ``score_strict``) unless ``headline`` overrides it; names that are not registry names
(a source called ``mathvista_mini``) fall back to ``accuracy``.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Metrics = Mapping[str, float]
NOTE = ("Rule-based scoring of the last \\boxed{} answer (no GPT judge; see diva_lightning/evaluation/). The paper's "
        "numbers come from GPT-judged protocols, so compare rows of this table with each other, not with the paper.")


def _order(names: list[str]) -> list[str]:
    from diva_lightning.evaluation import BENCHMARKS

    known = [n for n in BENCHMARKS if n in names]
    return known + [n for n in names if n not in known]


def _title_and_headline(name: str, headline: Mapping[str, str] | None) -> tuple[str, str]:
    from diva_lightning.evaluation import BENCHMARKS

    bench = BENCHMARKS.get(name)
    title = bench.title if bench else name
    metric = (headline or {}).get(name) or (bench.headline if bench else "accuracy")
    return title, metric


def _cell(metrics: Metrics | None, key: str) -> float | None:
    return None if metrics is None or key not in metrics else 100.0 * metrics[key]


def _fmt(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else (f"{value:+.1f}" if signed else f"{value:.1f}")


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known and len(known) == len(values) else None


def table1_report(results: Mapping[str, Metrics], out_dir: str | Path, baseline: Mapping[str, Metrics] | None = None,
                  *, label: str = "policy", baseline_label: str = "base policy",
                  headline: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write the Table-1-form report of ``results`` (``{benchmark: metrics}``; metrics as 0..1 fractions).

    Returns the paths: ``{"markdown", "csv", "png"}``.
    """
    if not results:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = _order(list(results))
    heads = {n: _title_and_headline(n, headline) for n in names}
    rows: list[tuple[str, Mapping[str, Metrics]]] = ([(baseline_label, baseline)] if baseline else [])
    rows.append((label, results))
    table = {model: [_cell(res.get(n), heads[n][1]) for n in names] for model, res in rows}

    header = ["model", *(f"{heads[n][0]} ({heads[n][1]})" for n in names), "Avg."]
    md = ["# Table 1", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, values in table.items():
        md.append("| " + " | ".join([model, *map(_fmt, values), _fmt(_mean(values))]) + " |")
    if baseline:
        deltas = [None if a is None or b is None else a - b for a, b in zip(table[label], table[baseline_label])]
        md.append("| " + " | ".join(["Δ", *(_fmt(d, signed=True) for d in deltas), _fmt(_mean(deltas), True)]) + " |")
    md += ["", NOTE, "", "## All metrics (%)", "", f"| benchmark | metric | {' | '.join(m for m, _ in rows)} |",
           "|---|---|" + "---|" * len(rows)]
    long_rows = []
    for n in names:
        keys = list(dict.fromkeys(k for _, res in rows for k in (res.get(n) or {})))
        for key in keys:
            values = [_cell(res.get(n), key) for _, res in rows]
            md.append(f"| {heads[n][0]} | {key} | " + " | ".join(map(_fmt, values)) + " |")
            long_rows += [(model, n, key, v) for (model, _), v in zip(rows, values) if v is not None]
    paths = {"markdown": out / "table1.md", "csv": out / "table1.csv", "png": out / "table1.png"}
    paths["markdown"].write_text("\n".join(md) + "\n", encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "benchmark", "metric", "value_percent"])
        writer.writerows((m, n, k, f"{v:.4f}") for m, n, k, v in long_rows)
    _bar_chart(paths["png"], [heads[n][0] for n in names], table)
    return paths


def _bar_chart(path: Path, titles: list[str], table: Mapping[str, list[float | None]]) -> None:
    """Grouped bars, one group per benchmark; the object API with the Agg canvas (no pyplot global state)."""
    fig = Figure(figsize=(max(6.0, 1.3 * len(titles) + 2), 4.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(table)
    for k, (model, values) in enumerate(table.items()):
        xs = [i + (k - (len(table) - 1) / 2) * width for i in range(len(titles))]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(xs, heights, width, label=model)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(titles)), titles)
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 108)  # room for the label of a 100% bar
    ax.set_title("Table 1 (rule-based scoring)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(table), frameon=False)  # below: no bar hidden
    fig.tight_layout()
    fig.savefig(path)
