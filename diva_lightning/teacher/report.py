"""The end-of-run report: kept/rejected by reason over every row of the output, and row statuses.

Built from the provenance stored in the output rows (not from this process's memory), so a resumed run
reports the whole file, including the rows an earlier run wrote.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from diva_lightning.teacher.pipeline import TASKS

STATUSES = ("full", "partial", "none")


def tally(provenance: Mapping[str, Mapping[str, Any]]) -> dict[str, Counter[str]]:
    """``{task: Counter(kept=n, <reason>=n, ...)}`` summed over rows, plus ``rows: Counter(<status>=n)``."""
    out: dict[str, Counter[str]] = {t: Counter() for t in (*TASKS, "rows")}
    for prov in provenance.values():
        out["rows"][prov["status"]] += 1
        for task in TASKS:
            counts = prov["counts"][task]
            out[task]["kept"] += counts["kept"]
            out[task].update(counts["rejected"])
    return out


def format_table(provenance: Mapping[str, Mapping[str, Any]], *, max_ids: int = 10) -> str:
    """The kept/rejected table (count and share of all candidates per task) and the row statuses, with
    the ids of rows that did not get everything (at most ``max_ids`` per status)."""
    totals = tally(provenance)
    lines = [f"{'item':<12} {'outcome':<16} {'count':>6} {'share':>7}"]
    for task in TASKS:
        counts = totals[task]
        total = sum(counts.values())
        if not total:
            continue
        order = ["kept", *sorted((r for r in counts if r != "kept"), key=lambda r: (-counts[r], r))]
        for k, outcome in enumerate(order):
            label = task if k == 0 else ""
            lines.append(f"{label:<12} {outcome:<16} {counts[outcome]:>6} {counts[outcome] / total:>7.1%}")
    rows = totals["rows"]
    n_rows = sum(rows.values())
    for k, status in enumerate(STATUSES):
        share = rows[status] / n_rows if n_rows else 0.0
        lines.append(f"{'rows' if k == 0 else '':<12} {status:<16} {rows[status]:>6} {share:>7.1%}")
    for status in STATUSES[1:]:
        ids = [i for i, p in provenance.items() if p["status"] == status]
        if ids:
            more = f" (+{len(ids) - max_ids} more)" if len(ids) > max_ids else ""
            lines.append(f"{status} rows: {', '.join(ids[:max_ids])}{more}")
    return "\n".join(lines)
