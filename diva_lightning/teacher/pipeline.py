"""One batch of questions through the teacher: ask, parse, check, count.

Per attempt (``attempts`` >= 1; later attempts ask again only for what is still missing, with a fresh
seed) the teacher is called twice:

1. the paraphrase requests (text only, K - kept asked for) and turn 1 of the think steps (image + problem);
2. turn 2 of the think steps (the same conversation plus turn 1's reply and the correct answer) and, with
   ``verify_paraphrases``, one solve request (image + paraphrase) per paraphrase that passed the checks.

Every candidate ends up kept or rejected for exactly one reason (``checks`` and ``parsing`` define the
reasons), so per row ``kept + sum(rejected) == asked`` for paraphrases (plus the ``extra`` ones the teacher
volunteered) and ``== attempts made`` for think steps.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from diva_lightning.core.choices import AUGMENT_TASKS as TASKS
from diva_lightning.core.choices import AugmentTask
from diva_lightning.data.schema import QuestionRecord
from diva_lightning.rewards import accuracy_reward
from diva_lightning.teacher import checks
from diva_lightning.teacher.base import Request, Teacher
from diva_lightning.teacher.parsing import parse_tagged
from diva_lightning.teacher.prompts import (
    STEP_TAG,
    VARIANT_TAG,
    paraphrase_prompt,
    revise_prompt,
    solve_prompt,
    steps_prompt,
)


@dataclass(frozen=True)
class AugmentSettings:
    """What is asked and how strictly it is checked (all of it goes into each row's provenance).

    Attributes:
        k: paraphrases wanted per question.
        attempts: rounds of asking; a round asks only for what earlier rounds did not yield.
        min_steps, max_steps: allowed number of think steps.
        max_similarity: a paraphrase this similar (``checks.similarity``) to the problem or to a kept
            paraphrase is rejected.
        verify_paraphrases: the teacher must solve each paraphrase to the ground truth for it to be kept.
        tasks: which fields to make: ``variants``, ``think_steps`` or both.
    """

    k: int = 5
    attempts: int = 1
    min_steps: int = 3
    max_steps: int = 5
    max_similarity: float = checks.DEFAULT_MAX_SIMILARITY
    verify_paraphrases: bool = False
    tasks: tuple[AugmentTask, ...] = TASKS

    def __post_init__(self) -> None:
        problems = []
        if self.k < 1 or self.attempts < 1:
            problems.append(f"k and attempts must be >= 1 (got {self.k}, {self.attempts})")
        if not 1 <= self.min_steps <= self.max_steps:
            problems.append(f"need 1 <= min_steps <= max_steps (got {self.min_steps}, {self.max_steps})")
        if not 0 < self.max_similarity <= 1:
            problems.append(f"max_similarity must lie in (0, 1], got {self.max_similarity}")
        if not self.tasks or set(self.tasks) - set(TASKS):
            problems.append(f"tasks must be some of {TASKS}, got {self.tasks}")
        if problems:
            raise ValueError("; ".join(problems))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["tasks"] = list(self.tasks)
        return out


@dataclass
class RowResult:
    """What the teacher gave one question: kept items and the count of rejections by reason."""

    record: QuestionRecord
    variants: list[str] = field(default_factory=list)
    think_steps: list[str] | None = None
    rejected: dict[str, Counter[str]] = field(default_factory=lambda: {t: Counter() for t in TASKS})

    def status(self, settings: AugmentSettings) -> str:
        """``full`` (everything asked was kept), ``partial`` or ``none`` (the row keeps its original fields)."""
        got = {"variants": len(self.variants) / settings.k, "think_steps": float(self.think_steps is not None)}
        wanted = [got[t] for t in settings.tasks]
        if all(g >= 1 for g in wanted):
            return "full"
        return "partial" if any(g > 0 for g in wanted) else "none"

    def counts(self) -> dict[str, dict[str, Any]]:
        """``{task: {"kept": n, "rejected": {reason: n}}}`` for the row's provenance and the run table."""
        kept = {"variants": len(self.variants), "think_steps": int(self.think_steps is not None)}
        return {t: {"kept": kept[t], "rejected": dict(sorted(self.rejected[t].items()))} for t in TASKS}

    def augmented(self) -> QuestionRecord:
        """The record with the kept items in place; a field with nothing kept keeps its original value."""
        r = self.record
        return QuestionRecord(r.id, r.problem, r.answer, list(r.images), r.difficulty,
                              list(self.variants) or list(r.variants),
                              list(self.think_steps) if self.think_steps is not None else list(r.think_steps),
                              r.answer_type, dict(r.meta))


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any printable parts (same parts, same seed, on every machine)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _steps_turns(record: QuestionRecord, s: AugmentSettings) -> tuple[tuple[Any, str], ...]:
    return (("user", steps_prompt(record.problem, min_steps=s.min_steps, max_steps=s.max_steps)),)


def _ask(teacher: Teacher, requests: list[Request], seed: int) -> list[str]:
    if not requests:
        return []
    replies = teacher.complete(requests, seed=seed)
    if len(replies) != len(requests):
        raise RuntimeError(f"{type(teacher).__name__} returned {len(replies)} replies for {len(requests)} requests")
    return replies


def augment_batch(teacher: Teacher, records: Sequence[QuestionRecord], images: Sequence[Sequence[torch.Tensor]],
                  settings: AugmentSettings, *, seed: int) -> list[RowResult]:
    """Run the teacher over one batch. ``images[i]`` are record ``i``'s decoded images ([3, H, W] in [0, 1])."""
    results = [RowResult(r) for r in records]
    imgs = [tuple(i) for i in images]
    for attempt in range(settings.attempts):
        want_var = [i for i, res in enumerate(results)
                    if "variants" in settings.tasks and len(res.variants) < settings.k]
        want_steps = [i for i, res in enumerate(results)
                      if "think_steps" in settings.tasks and res.think_steps is None]
        if not want_var and not want_steps:
            break
        first = [Request("paraphrase", (("user", paraphrase_prompt(records[i].problem,
                                                                    settings.k - len(results[i].variants))),),
                         (), records[i], count=settings.k - len(results[i].variants)) for i in want_var]
        first += [Request("steps", _steps_turns(records[i], settings), imgs[i], records[i]) for i in want_steps]
        replies = _ask(teacher, first, derive_seed(seed, attempt, "turn1"))
        var_replies, step_replies = replies[:len(want_var)], replies[len(want_var):]

        pending: list[tuple[int, str]] = []  # (row, paraphrase) that passed the text checks
        for i, reply in zip(want_var, var_replies):
            pending += [(i, text) for text in _check_paraphrases(results[i], reply, settings)]

        second = [Request("revise", (*_steps_turns(records[i], settings), ("assistant", reply),
                                     ("user", revise_prompt(records[i].answer, min_steps=settings.min_steps,
                                                            max_steps=settings.max_steps))),
                          imgs[i], records[i]) for i, reply in zip(want_steps, step_replies)]
        if settings.verify_paraphrases:
            second += [Request("solve", (("user", solve_prompt(text)),), imgs[i], records[i], problem=text)
                       for i, text in pending]
        replies = _ask(teacher, second, derive_seed(seed, attempt, "turn2"))
        for i, reply in zip(want_steps, replies[:len(want_steps)]):
            _check_steps(results[i], reply, settings)
        verdicts = replies[len(want_steps):] if settings.verify_paraphrases else [None] * len(pending)
        for (i, text), verdict in zip(pending, verdicts):
            if verdict is not None and accuracy_reward(verdict, records[i].answer) != 1.0:
                results[i].rejected["variants"]["unverified"] += 1
            else:
                results[i].variants.append(text)
    return results


def _check_paraphrases(result: RowResult, reply: str, settings: AugmentSettings) -> list[str]:
    """Parse one paraphrase reply, count its rejections, return the paraphrases that passed the checks."""
    record, asked = result.record, settings.k - len(result.variants)
    tagged = parse_tagged(reply, VARIANT_TAG)
    rejected = result.rejected["variants"]
    extra = len(tagged.extra(asked)) + len(tagged.duplicate)
    if extra:
        rejected["extra"] += extra
    passed: list[str] = []
    for n in range(1, asked + 1):
        text, why = tagged.slot(n)
        if text is not None:
            why = checks.check_paraphrase(text, record.problem, record.answer, [*result.variants, *passed],
                                          max_similarity=settings.max_similarity)
        if why is None and text is not None:
            passed.append(text)
        else:
            rejected[why or "missing"] += 1
    return passed


def _check_steps(result: RowResult, reply: str, settings: AugmentSettings) -> None:
    steps = parse_tagged(reply, STEP_TAG).contiguous()
    why = checks.check_steps(reply, steps, result.record.answer, min_steps=settings.min_steps,
                             max_steps=settings.max_steps)
    if why is None and steps is not None:
        result.think_steps = steps
    else:
        result.rejected["think_steps"][why or "malformed_steps"] += 1
