"""Cells of a study that have no result, and why: printed by the sweep and written at the top of report.md.

A cell without a COMPLETE trial is one of: *given up* (every try failed: its job failed, or it was failed as stale
after its worker died; after `--max-retries` retries it is not queued again: `sweeps/ablate.py --retry-given-up`
queues it once more), *never started* (queued, no worker popped it yet: the sweep was stopped early), *queued for a
retry* (failed, its retry not yet started) or *running* (a worker holds it now).
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from sweeps._common import Cell
from sweeps.study import cell_of, cell_states

HEADING = "## Cells without a result"


def _last_error(fails: list[FrozenTrial]) -> str:
    if not fails:
        return ""
    last = fails[-1]
    error = last.user_attrs.get("error")
    if error:
        lines = [ln for ln in str(error).splitlines() if ln.strip()]
        return f"trial {last.number}: {lines[0]}" + (f"; log {last.user_attrs['log_path']}"
                                                      if last.user_attrs.get("log_path") else "")
    return f"trial {last.number}: no result and no error (its worker died or went silent: failed as stale)"


def missing_cells(study: optuna.Study) -> list[tuple[Cell, str]]:
    """(cell, why) for every cell of the study without a COMPLETE trial, in queue order."""
    fails: dict[Cell, list[FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        cell = cell_of(t)
        if cell is not None:
            fails.setdefault(cell, []).append(t)
    out = []
    for cell, s in cell_states(study).items():
        if s.complete is not None:
            continue
        last = _last_error(fails.get(cell, []))
        if s.given_up:
            why = f"gave up after {s.fails} {'try' if s.fails == 1 else 'tries'} (last: {last})"
        elif s.running:
            why = f"running (trial {', '.join(str(t.number) for t in s.running)})"
        elif s.fails:
            why = f"queued for a retry after {s.fails} failed {'try' if s.fails == 1 else 'tries'} (last: {last})"
        else:
            why = "never started (still queued)"
        out.append((cell, why))
    return out


def missing_section(missing: list[tuple[Cell, str]]) -> str:
    """The markdown section naming each missing cell ('' when every cell has a result)."""
    if not missing:
        return ""
    lines = [HEADING, "", f"{len(missing)} cell(s) have no result; the tables below average the seeds that do.", "",
             "| cell | why |", "|---|---|"]
    lines += [f"| {cell.name} | {why.replace('|', '/')} |" for cell, why in missing]
    if any(why.startswith("gave up") for _, why in missing):
        lines += ["", "Run the sweep again with `--retry-given-up` to try the given-up cells once more."]
    return "\n".join(lines) + "\n"


def add_to_report(report: Path, study: optuna.Study) -> list[tuple[Cell, str]]:
    """Insert the missing-cells section right after report.md's title; returns the missing cells."""
    missing = missing_cells(study)
    section = missing_section(missing)
    if section:
        title, _, rest = report.read_text().partition("\n")
        report.write_text(f"{title}\n\n{section}{rest}")
    return missing
