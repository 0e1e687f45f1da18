"""Compose a world split by the base policy's measured success rate (the difficulty-skew knob, issue 14).

GRPO's learning signal vanishes on questions the policy almost never solves (every response wrong) or almost
always solves (every response right); DIVA exists for those. ``skew: {hard: 0.4, easy: 0.4}`` fills 40% of a split
with questions the base policy solves with p < ``hard_below``, 40% with p > ``easy_above``, and the rest from the
questions in between. The rates come from a *success table* measured once per base-policy build
(``python -m tools.success_table``): ``k`` right out of ``n`` sampled responses per question of a pool of
world questions, recorded with the weights' sha256 it was measured on.

Each chosen record gets ``meta["skew"]`` (``hard`` / ``easy`` / ``middle``) and ``meta["base_success"]`` (k/n), so
evaluation can report accuracy per share. Everything here is pure (no model): :func:`compose` is deterministic in
its seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from diva_lightning.data.schema import QuestionRecord

SHARES = ("hard", "easy", "middle")
TABLE_VERSION = 1


@dataclass
class SkewConfig:
    """Composition of a world split by the base policy's measured success rate."""

    hard: float = 0.0
    """Share of questions with measured p < hard_below (0 .. 1)."""
    easy: float = 0.0
    """Share of questions with measured p > easy_above (0 .. 1); hard + easy <= 1, the rest is 'middle'."""
    hard_below: float = 0.1
    """A question is hard when its measured success rate is below this."""
    easy_above: float = 0.9
    """A question is easy when its measured success rate is above this."""
    table: str = "embedded"
    """The success table: 'embedded' (measured for the shipped base policy, beside it) or a success.json path."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("hard", "easy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                problems.append(f"{name}={v} must lie in [0, 1]")
        if self.hard + self.easy > 1.0 + 1e-9:
            problems.append(f"hard + easy = {self.hard + self.easy:g} exceeds 1")
        if not 0.0 < self.hard_below <= self.easy_above < 1.0:
            problems.append(f"need 0 < hard_below ({self.hard_below}) <= easy_above ({self.easy_above}) < 1")
        if problems:
            raise ValueError("skew: " + "; ".join(problems))

    def counts(self, n: int) -> dict[str, int]:
        """Questions per share for a split of ``n`` (rounded; the middle takes the remainder, never below 0: with
        hard + easy = 1 both can round up, e.g. 0.5 x 3 -> 2 + 2, and easy then gets what is left)."""
        hard = round(self.hard * n)
        easy = min(round(self.easy * n), n - hard)
        return {"hard": hard, "easy": easy, "middle": n - hard - easy}


@dataclass
class SuccessTable:
    """``successes[id]`` right answers out of ``samples`` sampled responses, per question of the world's pools."""

    weights_sha256: str
    world_seed: int
    pools: dict[str, int]
    """Pool size per split: the table covers ``generate_world(pools[split], seed=world_seed, split=split)``."""
    samples: int
    successes: dict[str, int]
    settings: dict[str, Any] = field(default_factory=dict)
    """How it was measured (temperature, top_p, max_new_tokens, prompt, engine)."""

    @property
    def temperature(self) -> float:
        """The sampling temperature it was measured at (tables written before it was recorded: 1.0)."""
        return float(self.settings.get("temperature", 1.0))

    def rate(self, question_id: str) -> float:
        return self.successes[question_id] / self.samples

    def share_of(self, question_id: str, skew: SkewConfig) -> str:
        p = self.rate(question_id)
        return "hard" if p < skew.hard_below else "easy" if p > skew.easy_above else "middle"

    def save(self, path: str | Path) -> None:
        body = {"version": TABLE_VERSION, "weights_sha256": self.weights_sha256, "world_seed": self.world_seed,
                "pools": self.pools, "samples": self.samples, "settings": self.settings,
                "successes": self.successes}
        Path(path).write_text(json.dumps(body, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SuccessTable:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"success table {path}: missing (measure it: python -m "
                                    "tools.success_table --policy <dir> --out <file>)")
        try:
            body = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"success table {path}: not JSON ({err})") from err
        missing = [k for k in ("weights_sha256", "world_seed", "pools", "samples", "successes") if k not in body]
        if missing:
            raise ValueError(f"success table {path}: missing field(s) {missing}")
        if body.get("version") != TABLE_VERSION:
            raise ValueError(f"success table {path}: version {body.get('version')!r}, expected {TABLE_VERSION}")
        samples = int(body["samples"])
        bad = [qid for qid, k in body["successes"].items() if not (isinstance(k, int) and 0 <= k <= samples)]
        if samples < 1 or bad:
            raise ValueError(f"success table {path}: successes must be integers in 0..samples={samples}; "
                             f"bad rows: {bad[:5]}")
        return cls(str(body["weights_sha256"]), int(body["world_seed"]), {k: int(v) for k, v in body["pools"].items()},
                   samples, {str(k): int(v) for k, v in body["successes"].items()}, dict(body.get("settings", {})))


def compose(pool: Sequence[QuestionRecord], table: SuccessTable, n: int, skew: SkewConfig, *, seed: int | str,
            where: str = "skew") -> list[QuestionRecord]:
    """``n`` records of ``pool`` with the shares of ``skew`` (pool order kept; each tagged in ``meta``).

    Raises ``ValueError`` naming the shortfall when a share has fewer questions in the pool than it needs, and
    ``KeyError`` when a pool record is not in the table (the table was measured on another pool).
    """
    by_share: dict[str, list[int]] = {s: [] for s in SHARES}
    for i, record in enumerate(pool):
        if record.id not in table.successes:
            raise KeyError(f"{where}: question {record.id!r} is not in the success table (measured on another "
                           "world: seed or pool size)")
        by_share[table.share_of(record.id, skew)].append(i)
    need = skew.counts(n)
    short = [f"{s}: need {need[s]}, the pool has {len(by_share[s])}" for s in SHARES if len(by_share[s]) < need[s]]
    if short:
        raise ValueError(f"{where}: the pool of {len(pool)} questions cannot give {n} with skew hard={skew.hard:g} "
                         f"easy={skew.easy:g} ({'; '.join(short)}); lower the shares or the split size, or measure "
                         "a larger pool")
    rng = random.Random(f"diva-skew:{seed}")
    chosen: list[tuple[int, str]] = []
    for share in SHARES:
        picked = rng.sample(by_share[share], need[share])
        chosen += [(i, share) for i in picked]
    out = []
    for i, share in sorted(chosen):
        record = pool[i]
        meta = {**record.meta, "skew": share, "base_success": table.rate(record.id)}
        out.append(replace(record, meta=meta))
    return out


def share_counts(records: Sequence[QuestionRecord]) -> Mapping[str, int]:
    """How many records of each share (records composed by :func:`compose`)."""
    counts = dict.fromkeys(SHARES, 0)
    for r in records:
        counts[str(r.meta.get("skew", "middle"))] += 1
    return counts
