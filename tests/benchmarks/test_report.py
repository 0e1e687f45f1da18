"""table1_report: the markdown table with the base policy row and deltas, the long CSV, and the PNG chart."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from diva_lightning.evaluation import table1_report

RESULTS = {
    "wemath": {"accuracy": 0.70, "score_strict": 0.693, "IK": 0.1},
    "mathvista": {"accuracy": 0.742},
    "my_extra_set": {"accuracy": 0.5},
}
BASE = {"mathvista": {"accuracy": 0.682}, "wemath": {"accuracy": 0.60, "score_strict": 0.621, "IK": 0.2}}


def test_table1_markdown_csv_and_png(tmp_path: Path) -> None:
    paths = table1_report(RESULTS, tmp_path / "report", BASE, label="DIVA-GRPO")
    md = paths["markdown"].read_text().splitlines()
    # Benchmarks in the paper's order, unknown names last; WeMath's headline is score_strict.
    assert md[2] == "| model | MathVista (accuracy) | WeMath (score_strict) | my_extra_set (accuracy) | Avg. |"
    assert md[4] == "| base policy | 68.2 | 62.1 | – | – |"  # no base number for the extra set: no average
    assert md[5] == "| DIVA-GRPO | 74.2 | 69.3 | 50.0 | 64.5 |"   # (74.2 + 69.3 + 50.0) / 3
    assert md[6] == "| Δ | +6.0 | +7.2 | – | – |"
    assert "| WeMath | IK | 20.0 | 10.0 |" in md
    assert any("no GPT judge" in line for line in md)
    with paths["csv"].open() as f:
        rows = list(csv.DictReader(f))
    assert {"model": "base policy", "benchmark": "wemath", "metric": "score_strict", "value_percent": "62.1000"} in rows
    assert len(rows) == 2 * 4 + 1  # wemath 3 + mathvista 1 per model, the extra set for the policy only
    with Image.open(paths["png"]) as img:
        assert img.format == "PNG" and img.size[0] >= 600


def test_table1_without_baseline_and_with_a_headline_override(tmp_path: Path) -> None:
    paths = table1_report({"wemath": RESULTS["wemath"]}, tmp_path, headline={"wemath": "accuracy"})
    md = paths["markdown"].read_text().splitlines()
    assert md[2:5] == ["| model | WeMath (accuracy) | Avg. |", "|---|---|---|", "| policy | 70.0 | 70.0 |"]
    with pytest.raises(ValueError, match="no results"):
        table1_report({}, tmp_path)
