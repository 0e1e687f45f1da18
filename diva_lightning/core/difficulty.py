"""Dynamic question difficulty (design.md section 3).

Each *original* question holds one difficulty D in [d_min, d_max] (default [1, 9], initial 5). After a
question's family has been answered, its accuracy alpha moves D:

- ``rule="linear"`` (paper): ``D_new = clip(D_old + eta * (0.5 - alpha), d_min, d_max)``.
- ``rule="binned"`` (official code): alpha in [0, .05] -> +2, (.05, .3] -> +1, (.3, .5] -> 0,
  (.5, .7] -> -1, (.7, 1] -> -2 (first matching bin, inclusive upper bounds), then clip. ``eta`` is
  not used by this rule.

:class:`DifficultyTable` keeps the values keyed by string question id, applies updates now
(``update``, the ``update="step"`` cadence) or later (``accumulate`` + ``flush``, the official epoch
cadence), and merges per-rank statistics deterministically so all ranks hold the same table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor

from diva_lightning.core._checks import check_1d, check_float, check_same_length

# RULES and DIFFICULTY_STATISTICS (core.choices: what alpha is averaged from, "accuracy" (paper) or "reward" (the
# authors' code)) are re-exported (``X as X``) for the callers that import them from here.
from diva_lightning.core.choices import DIFFICULTY_STATISTICS as DIFFICULTY_STATISTICS
from diva_lightning.core.choices import RULES as RULES
from diva_lightning.core.choices import DifficultyRule, check_choice

# Official binned rule: upper bounds (inclusive) and the step for each bin; the last bin is (.7, 1].
_BIN_UPPER = (0.05, 0.3, 0.5, 0.7)
_BIN_STEP = (2.0, 1.0, 0.0, -1.0, -2.0)

DEFAULT_DIFFICULTY: float = 5.0
"""D of a question nothing has measured yet: the middle of the default scale [1, 9] (design.md section 3), the
difficulty of a record that sets none, the table's initial value and the medium tier's centre d_mid."""


def update_difficulty(
    old: Tensor,
    accuracy: Tensor,
    *,
    eta: float = 4.0,
    d_min: float = 1.0,
    d_max: float = 9.0,
    rule: DifficultyRule = "linear",
) -> Tensor:
    """Apply one difficulty update elementwise.

    Args:
        old: Tensor[N] float, current difficulties.
        accuracy: Tensor[N] float in [0, 1], accuracy of each question's family.
        eta: step size of the linear rule.
        d_min, d_max: clip range.
        rule: ``"linear"`` (paper) or ``"binned"`` (official).

    Returns:
        Tensor[N] in the dtype of ``old``: the new difficulties.

    Raises:
        ValueError: on non-1-D or non-float inputs, mismatched lengths, NaN difficulties, accuracy
            outside [0, 1] or NaN, an unknown rule, or ``d_min > d_max``.
    """
    check_1d("old", old)
    check_1d("accuracy", accuracy)
    check_float("old", old)
    check_float("accuracy", accuracy)
    check_same_length(old=old, accuracy=accuracy)
    check_choice("rule", rule, DifficultyRule)
    if d_min > d_max:
        raise ValueError(f"d_min ({d_min}) must not exceed d_max ({d_max})")
    if bool(torch.isnan(old).any()):
        raise ValueError(f"old difficulty has NaN at indices {torch.isnan(old).nonzero()[:, 0].tolist()}")
    # NaN fails both comparisons, so it is caught here too.
    bad = ~((accuracy >= 0) & (accuracy <= 1))
    if bool(bad.any()):
        idx = bad.nonzero()[:, 0].tolist()
        raise ValueError(
            f"accuracy must lie in [0, 1] (no NaN); bad values {accuracy[bad].tolist()} at indices {idx}"
        )
    acc = accuracy.to(old.dtype)
    if rule == "linear":
        new = old + eta * (0.5 - acc)
    else:
        bounds = torch.tensor(_BIN_UPPER, dtype=old.dtype, device=old.device)
        steps = torch.tensor(_BIN_STEP, dtype=old.dtype, device=old.device)
        # right=False gives bounds[i-1] < a <= bounds[i]: the inclusive upper bounds of the spec.
        new = old + steps[torch.bucketize(acc, bounds, right=False)]
    return new.clamp(d_min, d_max)


@dataclass(frozen=True)
class DifficultyStats:
    """Per-question answer counts waiting to be applied to a :class:`DifficultyTable`.

    Attributes:
        ids: question ids, one per entry (distinct after :meth:`DifficultyTable.merge_stats`).
        correct: Tensor[len(ids)] float64, summed accuracy (number of correct responses).
        count: Tensor[len(ids)] float64, number of responses.
    """

    ids: tuple[str, ...]
    correct: Tensor
    count: Tensor

    def __post_init__(self) -> None:
        # Accept any sequence of ids (e.g. a list from all_gather_object) but store an immutable tuple.
        object.__setattr__(self, "ids", tuple(str(i) for i in self.ids))
        check_1d("correct", self.correct)
        check_1d("count", self.count)
        if not (len(self.ids) == self.correct.shape[0] == self.count.shape[0]):
            raise ValueError(
                f"length mismatch: ids={len(self.ids)}, correct={self.correct.shape[0]}, "
                f"count={self.count.shape[0]}"
            )

    @staticmethod
    def empty() -> DifficultyStats:
        """Stats with no entries."""
        z = torch.zeros(0, dtype=torch.float64)
        return DifficultyStats((), z, z.clone())


def _as_f64(name: str, values: Tensor | Sequence[float], n: int) -> Tensor:
    """Convert correct/count input to a CPU float64 Tensor[n], validating length and sign."""
    t = torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)
    if t.shape[0] != n:
        raise ValueError(f"length mismatch: ids={n}, {name}={t.shape[0]}")
    bad = ~(torch.isfinite(t) & (t >= 0))
    if bool(bad.any()):
        raise ValueError(f"{name} must be finite and >= 0; bad at indices {bad.nonzero()[:, 0].tolist()}")
    return t


def _aggregate(ids: Sequence[str], correct: Tensor, count: Tensor) -> dict[str, list[float]]:
    """Sum (correct, count) per distinct id, keeping first-seen order; fsum makes sums order-exact."""
    if isinstance(ids, str):
        raise ValueError("ids must be a sequence of question ids, got a single str")
    parts: dict[str, tuple[list[float], list[float]]] = {}
    for i, qid in enumerate(ids):
        c, n = parts.setdefault(str(qid), ([], []))
        c.append(float(correct[i]))
        n.append(float(count[i]))
    # math.fsum is correctly rounded, hence independent of the order of its terms: this is what makes
    # merging stats from ranks in any order give a bit-identical table.
    return {qid: [math.fsum(c), math.fsum(n)] for qid, (c, n) in parts.items()}


@dataclass
class DifficultyTable:
    """One difficulty per string question id.

    Args:
        initial: value of ids never updated (design: 5 = D_mid).
        d_min, d_max, eta, rule: as in :func:`update_difficulty`.
    """

    initial: float = DEFAULT_DIFFICULTY
    d_min: float = 1.0
    d_max: float = 9.0
    eta: float = 4.0
    rule: DifficultyRule = "linear"
    _values: dict[str, float] = field(default_factory=dict, repr=False)
    _pending: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        check_choice("rule", self.rule, DifficultyRule)
        if not self.d_min <= self.initial <= self.d_max:
            raise ValueError(
                f"initial ({self.initial}) must lie in [d_min, d_max] = [{self.d_min}, {self.d_max}]"
            )

    # ---- seeding -------------------------------------------------------------------------------
    def seed(self, values: Mapping[str, float]) -> int:
        """Give ids that have no value yet a starting difficulty (a record's own ``difficulty``).

        Ids already stored keep theirs (a resumed run's table wins). Returns the number of ids seeded.

        Raises:
            ValueError: a value outside [d_min, d_max] or not finite (ids listed).
        """
        bad = [q for q, v in values.items() if not (math.isfinite(v) and self.d_min <= v <= self.d_max)]
        if bad:
            raise ValueError(f"seed difficulties outside [{self.d_min}, {self.d_max}] for ids {bad[:10]}")
        new = {str(q): float(v) for q, v in values.items() if str(q) not in self._values}
        self._values.update(new)
        return len(new)

    # ---- reading -------------------------------------------------------------------------------
    def lookup(self, ids: Sequence[str]) -> Tensor:
        """Tensor[len(ids)] float32 of difficulties; unknown ids get ``initial``."""
        if isinstance(ids, str):
            raise ValueError("ids must be a sequence of question ids, got a single str")
        return torch.tensor([self._values.get(str(i), self.initial) for i in ids], dtype=torch.float32)

    def values(self) -> Tensor:
        """Tensor[len(self)] float32 of the stored values, in the order ids were first stored."""
        return torch.tensor(list(self._values.values()), dtype=torch.float32)

    def as_dict(self) -> dict[str, float]:
        """A copy of the stored values (ids that were updated at least once)."""
        return dict(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, qid: object) -> bool:
        return qid in self._values

    def histogram(self, bins: int = 8) -> Tensor:
        """Tensor[bins] int64: counts of stored values in equal-width bins over [d_min, d_max]."""
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        values = torch.tensor(list(self._values.values()), dtype=torch.float64)
        if values.numel() == 0:
            return torch.zeros(bins, dtype=torch.int64)
        return torch.histc(values, bins=bins, min=self.d_min, max=self.d_max).to(torch.int64)

    # ---- updating ------------------------------------------------------------------------------
    def update(
        self, ids: Sequence[str], correct: Tensor | Sequence[float], count: Tensor | Sequence[float]
    ) -> Tensor:
        """Apply the rule now with ``alpha = sum(correct) / sum(count)`` per distinct id.

        Duplicate ids in one call are aggregated first, so the rule runs once per question.

        Returns:
            Tensor[number of distinct ids] float32: the new values, in the order in which each id first
            appears in ``ids``.

        Raises:
            ValueError: on mismatched lengths, negative or non-finite counts, ``correct > count`` for an
                id, or an id whose summed count is 0 (its accuracy is undefined).
        """
        n = len(ids)
        agg = _aggregate(ids, _as_f64("correct", correct, n), _as_f64("count", count, n))
        return self._apply(agg)

    def apply(self, stats: DifficultyStats) -> Tensor:
        """:meth:`update` with the contents of ``stats`` (e.g. the output of :meth:`merge_stats`)."""
        return self.update(stats.ids, stats.correct, stats.count)

    def accumulate(
        self, ids: Sequence[str], correct: Tensor | Sequence[float], count: Tensor | Sequence[float]
    ) -> None:
        """Store counts to apply at the next :meth:`flush` (official epoch cadence)."""
        n = len(ids)
        agg = _aggregate(ids, _as_f64("correct", correct, n), _as_f64("count", count, n))
        for qid, (c, k) in agg.items():
            slot = self._pending.setdefault(qid, [0.0, 0.0])
            slot[0] = math.fsum((slot[0], c))
            slot[1] = math.fsum((slot[1], k))

    def pending_stats(self) -> DifficultyStats:
        """The accumulated, not yet applied counts (first-seen order), e.g. to gather across ranks."""
        ids = tuple(self._pending)
        c = torch.tensor([v[0] for v in self._pending.values()], dtype=torch.float64)
        n = torch.tensor([v[1] for v in self._pending.values()], dtype=torch.float64)
        return DifficultyStats(ids, c, n)

    def clear_pending(self) -> None:
        """Drop accumulated counts without applying them."""
        self._pending.clear()

    def flush(self) -> Tensor:
        """Apply and clear the accumulated counts; returns new values as :meth:`update` does."""
        # Clear only after a successful apply, so a ValueError leaves the pending counts intact.
        new = self._apply({k: list(v) for k, v in self._pending.items()})
        self._pending.clear()
        return new

    def _apply(self, agg: dict[str, list[float]]) -> Tensor:
        if not agg:
            return torch.zeros(0, dtype=torch.float32)
        ids = list(agg)
        correct = torch.tensor([agg[i][0] for i in ids], dtype=torch.float64)
        count = torch.tensor([agg[i][1] for i in ids], dtype=torch.float64)
        if bool((count <= 0).any()):
            bad = [ids[j] for j in (count <= 0).nonzero()[:, 0].tolist()]
            raise ValueError(f"count must be > 0 for every id; zero total count for {bad}")
        if bool((correct > count).any()):
            bad = [ids[j] for j in (correct > count).nonzero()[:, 0].tolist()]
            raise ValueError(f"correct exceeds count for ids {bad}")
        old = torch.tensor([self._values.get(i, self.initial) for i in ids], dtype=torch.float64)
        new = update_difficulty(
            old, correct / count, eta=self.eta, d_min=self.d_min, d_max=self.d_max, rule=self.rule
        )
        for qid, v in zip(ids, new.tolist()):
            self._values[qid] = v
        return new.to(torch.float32)

    @staticmethod
    def merge_stats(stats: Sequence[DifficultyStats]) -> DifficultyStats:
        """Sum stats from several ranks per id; ids come out sorted, sums are exactly rounded.

        The result does not depend on the order of ``stats`` nor of entries within them, so every rank
        that applies the merged stats to an identical table ends with an identical table.
        """
        ids: list[str] = []
        correct: list[Tensor] = []
        count: list[Tensor] = []
        for s in stats:
            ids.extend(s.ids)
            correct.append(s.correct.detach().to("cpu", torch.float64))
            count.append(s.count.detach().to("cpu", torch.float64))
        if not ids:
            return DifficultyStats.empty()
        agg = _aggregate(ids, torch.cat(correct), torch.cat(count))
        keys = tuple(sorted(agg))
        return DifficultyStats(
            keys,
            torch.tensor([agg[k][0] for k in keys], dtype=torch.float64),
            torch.tensor([agg[k][1] for k in keys], dtype=torch.float64),
        )

    # ---- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain python + tensors: ids, float64 values, pending counts and the config."""
        pending = self.pending_stats()
        return {
            "ids": list(self._values),
            "values": torch.tensor(list(self._values.values()), dtype=torch.float64),
            "pending_ids": list(pending.ids),
            "pending_correct": pending.correct,
            "pending_count": pending.count,
            "config": self._config(),
        }

    def _config(self) -> dict[str, Any]:
        """The table's settings (its public fields) by name: what a checkpoint records with the values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore exactly what :meth:`state_dict` saved, config included.

        Keys missing from an older checkpoint keep this table's current setting (config) or default to
        empty (values, pending).
        """
        config = {**self._config(), **state.get("config", {})}
        check_choice("rule", config["rule"], DifficultyRule)
        ids = [str(i) for i in state.get("ids", [])]
        values = torch.as_tensor(state.get("values", torch.zeros(0)), dtype=torch.float64).reshape(-1)
        if len(ids) != values.shape[0]:
            raise ValueError(f"state_dict length mismatch: ids={len(ids)}, values={values.shape[0]}")
        p_ids = [str(i) for i in state.get("pending_ids", [])]
        p_c = torch.as_tensor(state.get("pending_correct", torch.zeros(0)), dtype=torch.float64).reshape(-1)
        p_n = torch.as_tensor(state.get("pending_count", torch.zeros(0)), dtype=torch.float64).reshape(-1)
        if not len(p_ids) == p_c.shape[0] == p_n.shape[0]:
            raise ValueError("state_dict length mismatch in pending_ids/pending_correct/pending_count")
        for name in ("initial", "d_min", "d_max", "eta"):
            setattr(self, name, float(config[name]))
        self.rule = config["rule"]  # checked above
        self._values = dict(zip(ids, values.tolist()))
        self._pending = {i: [c, n] for i, c, n in zip(p_ids, p_c.tolist(), p_n.tolist())}
