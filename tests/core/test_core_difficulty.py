"""Difficulty update rule and DifficultyTable: hand-worked values, properties, reference, edge cases."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diva_lightning.core.difficulty import DifficultyStats, DifficultyTable, update_difficulty

F64 = torch.float64


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=F64)


# ---- update_difficulty: hand-worked -------------------------------------------------------------


def test_linear_rule_hand_worked() -> None:
    # D + 4 * (0.5 - alpha):
    #   5 + 4*(0.5-0.0) = 7;  5 + 4*(0.5-1.0) = 3;  5 + 4*(0.5-0.5) = 5;  2 + 4*(0.5-0.25) = 3
    #   8.5 + 4*0.5 = 10.5 -> clipped to 9;  1.5 + 4*(-0.5) = -0.5 -> clipped to 1
    old = t(5, 5, 5, 2, 8.5, 1.5)
    acc = t(0, 1, 0.5, 0.25, 0, 1)
    assert update_difficulty(old, acc).tolist() == [7, 3, 5, 3, 9, 1]


def test_binned_rule_hand_worked_with_inclusive_upper_bounds() -> None:
    # bins: [0,.05] +2 | (.05,.3] +1 | (.3,.5] 0 | (.5,.7] -1 | (.7,1] -2, then clip to [1, 9]
    acc = t(0.0, 0.05, 0.06, 0.3, 0.31, 0.5, 0.51, 0.7, 0.71, 1.0)
    old = torch.full((10,), 5.0, dtype=F64)
    assert update_difficulty(old, acc, rule="binned").tolist() == [7, 7, 6, 6, 5, 5, 4, 4, 3, 3]
    # clipping: 8 + 2 = 10 -> 9; 2 - 2 = 0 -> 1
    assert update_difficulty(t(8, 2), t(0, 1), rule="binned").tolist() == [9, 1]


def test_binned_bounds_hold_in_float32() -> None:
    # 3/10 computed in float32 must still land in the (.05, .3] bin (+1), not the next one.
    acc = torch.tensor([3.0], dtype=torch.float32) / 10
    assert update_difficulty(torch.tensor([5.0]), acc, rule="binned").item() == 6.0


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_rejects_accuracy_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ValueError, match=r"accuracy must lie in \[0, 1\].*indices \[1\]"):
        update_difficulty(t(5, 5), t(0.5, bad))


def test_rejects_bad_shapes_and_rule() -> None:
    with pytest.raises(ValueError, match="length mismatch: old=2, accuracy=3"):
        update_difficulty(t(5, 5), t(0, 0, 0))
    with pytest.raises(ValueError, match="1-D"):
        update_difficulty(torch.ones(2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="rule"):
        update_difficulty(t(5), t(0), rule="cosine")


# ---- update_difficulty: properties ------------------------------------------------------------------

unit = st.floats(0.0, 1.0, allow_nan=False)
diff = st.floats(1.0, 9.0, allow_nan=False)


@settings(max_examples=80, deadline=None)
@given(d=diff, a1=unit, a2=unit, rule=st.sampled_from(["linear", "binned"]))
def test_update_is_monotone_non_increasing_in_accuracy_and_bounded(
    d: float, a1: float, a2: float, rule: str
) -> None:
    lo, hi = min(a1, a2), max(a1, a2)
    new = update_difficulty(t(d, d), t(lo, hi), rule=rule)
    assert new[0] >= new[1]  # higher accuracy never makes a question harder
    assert bool(((new >= 1) & (new <= 9)).all())


@settings(max_examples=60, deadline=None)
@given(d=diff, a=unit, eta=st.floats(0.0, 10.0))
def test_linear_rule_matches_python_formula(d: float, a: float, eta: float) -> None:
    expected = min(9.0, max(1.0, d + eta * (0.5 - a)))
    assert update_difficulty(t(d), t(a), eta=eta).item() == pytest.approx(expected, abs=1e-12)


def _binned_reference(d: float, a: float) -> float:
    """Straight transcription of the official if/elif chain."""
    if a <= 0.05:
        step = 2
    elif a <= 0.3:
        step = 1
    elif a <= 0.5:
        step = 0
    elif a <= 0.7:
        step = -1
    else:
        step = -2
    return min(9.0, max(1.0, d + step))


@settings(max_examples=60, deadline=None)
@given(d=diff, a=unit)
def test_binned_rule_matches_if_chain(d: float, a: float) -> None:
    assert update_difficulty(t(d), t(a), rule="binned").item() == _binned_reference(d, a)


# ---- DifficultyTable ------------------------------------------------------------------------------


def test_table_lookup_defaults_and_update_aggregates_duplicates() -> None:
    table = DifficultyTable()
    assert table.lookup(["a", "b"]).tolist() == [5.0, 5.0]
    assert table.lookup(["a"]).dtype == torch.float32
    # "b" appears twice: alpha_b = (1 + 3) / (2 + 2) = 1.0 -> 5 + 4*(0.5-1) = 3
    # "a": alpha = 1/4 -> 5 + 4*0.25 = 6. Returned in first-seen order: b, a.
    new = table.update(["b", "a", "b"], [1, 1, 3], [2, 4, 2])
    assert new.tolist() == [3.0, 6.0]
    assert table.lookup(["a", "b", "zzz"]).tolist() == [6.0, 3.0, 5.0]
    assert len(table) == 2 and "a" in table and "zzz" not in table
    assert table.as_dict() == {"b": 3.0, "a": 6.0}
    assert table.values().tolist() == [3.0, 6.0]


def test_table_update_rejects_bad_counts() -> None:
    table = DifficultyTable()
    with pytest.raises(ValueError, match="zero total count"):
        table.update(["a"], [0], [0])
    with pytest.raises(ValueError, match="correct exceeds count"):
        table.update(["a"], [3], [2])
    with pytest.raises(ValueError, match="length mismatch"):
        table.update(["a", "b"], [1], [1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        table.update(["a"], [-1], [1])
    assert len(table) == 0  # nothing was written by the failed calls


def test_accumulate_then_flush_is_epoch_cadence() -> None:
    table = DifficultyTable(rule="binned")
    table.accumulate(["q1", "q2"], [0, 5], [5, 5])
    table.accumulate(["q1"], [0], [5])
    assert table.lookup(["q1", "q2"]).tolist() == [5.0, 5.0]  # nothing applied yet
    # q1: 0/10 -> +2 = 7; q2: 5/5 -> -2 = 3
    assert table.flush().tolist() == [7.0, 3.0]
    assert table.lookup(["q1", "q2"]).tolist() == [7.0, 3.0]
    assert table.pending_stats().ids == ()
    assert table.flush().numel() == 0


def test_histogram_counts_values() -> None:
    table = DifficultyTable()
    table.update(["a", "b", "c"], [0, 1, 0.5], [1, 1, 1])  # values 7, 3, 5
    # 4 bins over [1, 9]: [1,3) [3,5) [5,7) [7,9] -> 0, 1, 1, 1
    assert table.histogram(4).tolist() == [0, 1, 1, 1]
    assert DifficultyTable().histogram(3).tolist() == [0, 0, 0]


def test_merge_stats_hand_worked() -> None:
    r0 = DifficultyStats(("b", "a"), t(1, 2), t(5, 5))
    r1 = DifficultyStats(("a", "c"), t(3, 0), t(5, 5))
    merged = DifficultyTable.merge_stats([r0, r1])
    assert merged.ids == ("a", "b", "c")  # sorted
    assert merged.correct.tolist() == [5, 1, 0] and merged.count.tolist() == [10, 5, 5]
    # ids given as a list (as all_gather_object returns them) are stored as a tuple
    assert DifficultyStats(["x"], t(1), t(2)).ids == ("x",)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="length mismatch: ids=2, correct=1, count=1"):
        DifficultyStats(("x", "y"), t(1), t(2))


stats_entries = st.lists(
    st.tuples(st.sampled_from(["q0", "q1", "q2", "q3", "q4"]), st.integers(0, 5), st.integers(0, 5)),
    min_size=1,
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(entries=stats_entries, n_ranks=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_merge_order_independent_and_every_rank_gets_same_table(
    entries: list[tuple[str, int, int]], n_ranks: int, seed: int
) -> None:
    # correct <= count, count >= 1 for every entry (a response count of 0 is meaningless here)
    entries = [(q, min(c, n + 1), n + 1) for q, c, n in entries]
    rng = random.Random(seed)
    shards: list[list[tuple[str, int, int]]] = [[] for _ in range(n_ranks)]
    for e in entries:
        shards[rng.randrange(n_ranks)].append(e)

    def stats(shard: list[tuple[str, int, int]]) -> DifficultyStats:
        return DifficultyStats(
            tuple(q for q, _, _ in shard), t(*[c for _, c, _ in shard]), t(*[n for _, _, n in shard])
        )

    per_rank = [stats(s) for s in shards]
    shuffled = per_rank[:]
    rng.shuffle(shuffled)
    a, b = DifficultyTable.merge_stats(per_rank), DifficultyTable.merge_stats(shuffled)
    assert a.ids == b.ids and torch.equal(a.correct, b.correct) and torch.equal(a.count, b.count)
    tables = [DifficultyTable(), DifficultyTable()]
    tables[0].apply(a)
    tables[1].apply(b)
    assert tables[0].as_dict() == tables[1].as_dict()
    # ... and equal to one table updated with all entries at once
    single = DifficultyTable()
    single.update([q for q, _, _ in entries], [c for _, c, _ in entries], [n for _, _, n in entries])
    assert single.as_dict() == tables[0].as_dict()


def test_merge_of_fractional_sums_is_bitwise_order_independent() -> None:
    # Plain float addition is not associative: 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1 in binary64.
    parts = [DifficultyStats(("q",), t(x), t(1)) for x in (0.1, 0.2, 0.3)]
    fwd = DifficultyTable.merge_stats(parts).correct.item()
    bwd = DifficultyTable.merge_stats(parts[::-1]).correct.item()
    assert fwd == bwd


@settings(max_examples=40, deadline=None)
@given(entries=stats_entries, pending=stats_entries, rule=st.sampled_from(["linear", "binned"]))
def test_state_dict_round_trip(
    entries: list[tuple[str, int, int]], pending: list[tuple[str, int, int]], rule: str
) -> None:
    table = DifficultyTable(rule=rule, eta=3.0)
    table.update(
        [q for q, _, _ in entries], [min(c, n + 1) for _, c, n in entries], [n + 1 for _, _, n in entries]
    )
    table.accumulate(
        [q for q, _, _ in pending], [min(c, n + 1) for _, c, n in pending], [n + 1 for _, _, n in pending]
    )
    restored = DifficultyTable()  # default config: the state must bring rule and eta back
    restored.load_state_dict(table.state_dict())
    assert restored.as_dict() == table.as_dict()
    assert list(restored.as_dict()) == list(table.as_dict())  # insertion order kept too
    assert (restored.rule, restored.eta) == (rule, 3.0)
    # the restored pending counts flush to the same values
    assert torch.equal(restored.flush(), table.flush())
    assert restored.as_dict() == table.as_dict()


def test_load_state_dict_tolerates_missing_keys() -> None:
    table = DifficultyTable(rule="binned")
    # An older checkpoint with only ids and values: pending empty, config kept from the instance.
    table.load_state_dict({"ids": ["a"], "values": torch.tensor([2.0])})
    assert table.as_dict() == {"a": 2.0} and table.rule == "binned"
    assert table.pending_stats().ids == ()
    table.load_state_dict({})
    assert len(table) == 0


def test_seed_sets_only_unknown_ids_and_checks_the_range() -> None:
    table = DifficultyTable()
    table.update(["a"], torch.tensor([1.0]), torch.tensor([1.0]))  # 5 + 4 * (0.5 - 1) = 3
    assert table.seed({"a": 9.0, "b": 7.0}) == 1
    assert table.lookup(["a", "b", "c"]).tolist() == [3.0, 7.0, 5.0]
    with pytest.raises(ValueError, match=r"outside \[1.0, 9.0\] for ids \['x'\]"):
        table.seed({"x": 10.0})
