"""Aggregates with hand-worked numbers: per-group accuracies, mean@k, and WeMath's four dimensions."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.evaluation import get_benchmark

from .conftest import wemath_composite, write_mathverse, write_mathvision, write_mmk12, write_wemath


def read(name: str, path: Path) -> list[QuestionRecord]:
    return get_benchmark(name).read(path)[0]


def test_mathverse_accuracy_per_problem_version(tmp_path: Path) -> None:
    records = read("mathverse", write_mathverse(tmp_path))  # ids 1-5 free-form (5 versions), 6 TD and 7 VO
    scores = {"1": [1.0], "2": [1.0, 0.0], "3": [0.0], "4": [1.0], "5": [0.0], "6": [1.0], "7": [1.0, 1.0, 0.0]}
    metrics = get_benchmark("mathverse").aggregate(records, scores)
    # per-row means: 1, .5, 0, 1, 0, 1, 2/3 -> overall (1 + .5 + 0 + 1 + 0 + 1 + 2/3) / 7 = 25/42
    assert metrics == pytest.approx({
        "accuracy": 25 / 42,
        "accuracy/Text Dominant": (1.0 + 1.0) / 2,     # rows 1 and 6
        "accuracy/Text Lite": 0.5,                     # row 2
        "accuracy/Vision Intensive": 0.0,              # row 3
        "accuracy/Vision Dominant": 1.0,               # row 4
        "accuracy/Vision Only": (0.0 + 2 / 3) / 2,     # rows 5 and 7
    })


def test_mathvision_accuracy_per_level(tmp_path: Path) -> None:
    records = read("mathvision", write_mathvision(tmp_path))  # levels: 1, 2, 2, 3, 3, 4
    scores = {"1": [1.0], "2": [0.0], "3": [1.0], "4": [1.0, 0.0, 0.0, 1.0], "5": [0.0], "6": [1.0]}
    assert get_benchmark("mathvision").aggregate(records, scores) == pytest.approx(
        {"accuracy": 3.5 / 6, "accuracy/level1": 1.0, "accuracy/level2": 0.5, "accuracy/level3": 0.25,
         "accuracy/level4": 1.0})


def test_mmk12_accuracy_per_subject(tmp_path: Path) -> None:
    records = read("mmk12", write_mmk12(tmp_path))  # subjects: math, math, physics, chemistry
    scores = {"1": [1.0], "2": [0.0], "3": [1.0], "4": [0.0]}
    assert get_benchmark("mmk12").aggregate(records, scores) == pytest.approx(
        {"accuracy": 0.5, "accuracy/chemistry": 0.0, "accuracy/math": 0.5, "accuracy/physics": 1.0})


def test_aggregate_refuses_missing_unknown_and_out_of_range_scores(tmp_path: Path) -> None:
    bench, records = get_benchmark("mmk12"), read("mmk12", write_mmk12(tmp_path))
    with pytest.raises(ValueError, match=r"2 record\(s\) without a score: '3', '4'"):
        bench.aggregate(records, {"1": [1.0], "2": [1.0], "3": []})
    with pytest.raises(ValueError, match=r"1 scored id\(s\) that are not records: '99'"):
        bench.aggregate(records, {"1": [1.0], "2": [1.0], "3": [1.0], "4": [1.0], "99": [1.0]})
    with pytest.raises(ValueError, match=r"scores must lie in \[0, 1\]"):
        bench.aggregate(records, {"1": [2.0], "2": [1.0], "3": [1.0], "4": [1.0]})


# WeMath: six composite problems, one per outcome (R = right, W = wrong; one-step rows, then the multi row).
#   A: RR|R  CM_strict, CM_loose      B: RW|R  RM_strict, CM_loose      C: WW|R  RM_strict, RM_loose
#   D: RR|W  IG                       E: RW|W  IK                       F: WWW|W (3 steps)  IK
OUTCOMES = {"A": ("RR", "R"), "B": ("RW", "R"), "C": ("WW", "R"), "D": ("RR", "W"), "E": ("RW", "W"),
            "F": ("WWW", "W")}


@pytest.fixture
def wemath_records(tmp_path: Path) -> list[QuestionRecord]:
    rows = list(itertools.chain.from_iterable(wemath_composite(g, len(subs)) for g, (subs, _) in OUTCOMES.items()))
    return read("wemath", write_wemath(tmp_path, rows))


def _outcome_scores(records: list[QuestionRecord]) -> dict[str, list[float]]:
    scores = {}
    for r in records:
        subs, multi = OUTCOMES[r.meta["group"]]
        key = r.meta["key"]
        mark = multi if key.endswith("multi") else subs[int(key.rsplit("_", 1)[1]) - 1]
        scores[r.id] = [1.0 if mark == "R" else 0.0]
    return scores


def test_wemath_four_dimensions_on_hand_built_composites(wemath_records: list[QuestionRecord]) -> None:
    metrics = get_benchmark("wemath").aggregate(wemath_records, _outcome_scores(wemath_records))
    # N = 6: IK = 2 (E, F), IG = 1 (D), CM_strict = 1 (A), CM_loose = 2 (A, B), RM_strict = 2 (B, C),
    # RM_loose = 1 (C). Rows right: 3 + 2 + 1 + 2 + 1 + 0 = 9 of 19.
    assert metrics == pytest.approx({
        "accuracy": 9 / 19,
        "score_strict": (6 - 0.5 * 1 - 2 - 2) / 6,   # (N - IG/2 - RM_strict - IK) / N = 0.25
        "score_loose": (6 - 0.5 * 1 - 1 - 2) / 6,    # (N - IG/2 - RM_loose - IK) / N
        "IK": 2 / 6,
        "IG": 1 / 6,
        "CM_strict": 1 / 6,
        "CM_loose": 2 / 6,
        "RM_strict": 2 / (1 + 2),                     # RM / (CM + RM), as the official script
        "RM_loose": 1 / (2 + 1),
    })
    assert list(metrics) == ["accuracy", "score_strict", "score_loose", "IK", "IG", "CM_strict", "CM_loose",
                             "RM_strict", "RM_loose"]


def test_wemath_mean_at_k_is_the_expectation_over_samples(wemath_records: list[QuestionRecord]) -> None:
    """Rows sampled independently: the metrics of per-row means equal the average over all joint draws."""
    bench = get_benchmark("wemath")
    draws = {r.id: ([1.0, 0.0] if r.meta["group"] in ("B", "D") else [1.0]) for r in wemath_records}
    varied = [rid for rid, d in draws.items() if len(d) == 2]
    joint = []
    for picks in itertools.product([1.0, 0.0], repeat=len(varied)):
        one = {rid: [d[0]] for rid, d in draws.items()}
        one.update({rid: [p] for rid, p in zip(varied, picks)})
        joint.append(bench.aggregate(wemath_records, one))
    expected = {k: sum(m[k] for m in joint) / len(joint) for k in joint[0] if not k.startswith("RM_")}
    got = bench.aggregate(wemath_records, draws)
    assert {k: v for k, v in got.items() if not k.startswith("RM_")} == pytest.approx(expected)
