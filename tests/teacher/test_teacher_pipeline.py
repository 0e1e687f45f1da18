"""One batch through the pipeline: the world teacher on real checks, and the accounting of every candidate."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import pytest

from diva_lightning.data.schema import QuestionRecord
from diva_lightning.data.world import generate_world, render_tensor
from diva_lightning.teacher import AugmentSettings, Request, Teacher, WorldTeacher, augment_batch
from diva_lightning.teacher.pipeline import RowResult


class ScriptedTeacher(Teacher):
    """A teacher whose replies a test writes (a user-supplied component, not a stand-in for ours)."""

    def __init__(self, reply: Callable[[Request, int], str]) -> None:
        self.reply = reply
        self.seen: list[Request] = []

    @property
    def teacher_id(self) -> str:
        return "scripted"

    def settings(self) -> dict[str, Any]:
        return {}

    def complete(self, requests: Sequence[Request], *, seed: int) -> list[str]:
        self.seen += requests
        return [self.reply(r, seed) for r in requests]


def _plain(n: int) -> list[QuestionRecord]:
    return [replace(r, variants=[], think_steps=[]) for r in generate_world(n, seed=3, split="train")]


def _images(records: Sequence[QuestionRecord]) -> list[list[Any]]:
    return [[render_tensor(r)] for r in records]


def _asked(res: RowResult, task: str) -> int:
    c = res.counts()[task]
    return c["kept"] + sum(c["rejected"].values())


def test_world_teacher_passes_real_checks_and_steps_hide_the_answer() -> None:
    records = _plain(8)
    results = augment_batch(WorldTeacher(), records, _images(records), AugmentSettings(k=4), seed=0)
    for rec, res in zip(records, results):
        assert _asked(res, "variants") == 4 and _asked(res, "think_steps") == 1
        assert len(res.variants) == 4 and all(v.count("<image>") == 1 for v in res.variants)
        assert rec.problem not in res.variants
        if res.think_steps is not None:
            assert 3 <= len(res.think_steps) <= 5
            assert not res.think_steps[-1].endswith(f" {rec.answer}.")  # the conclusion was cut
        else:
            assert res.counts()["think_steps"]["rejected"] == {"states_answer": 1}
    assert sum(r.think_steps is not None for r in results) >= 6


def test_a_wrong_ground_truth_rejects_steps_and_verified_paraphrases() -> None:
    records = _plain(4)
    wrong = [replace(r, answer="99") for r in records]
    settings = AugmentSettings(k=2, verify_paraphrases=True)
    results = augment_batch(WorldTeacher(), wrong, _images(wrong), settings, seed=0)
    for res in results:
        assert res.variants == [] and res.think_steps is None and res.status(settings) == "none"
        assert res.counts()["variants"]["rejected"] == {"unverified": 2}
        assert res.counts()["think_steps"]["rejected"] == {"wrong_answer": 1}
        # nothing kept: the record keeps its original (empty) fields
        assert res.augmented().variants == [] and res.augmented().think_steps == []


def test_every_candidate_is_counted_once_and_attempts_ask_only_for_what_is_missing() -> None:
    records = _plain(2)

    def reply(req: Request, seed: int) -> str:
        if req.kind == "paraphrase" and req.count == 3:  # attempt 1: one good, one copy, one malformed, extra
            return ("<variant1>Count the red shapes in <image> now.</variant1>"
                    f"<variant2>{req.record.problem}</variant2><variant3>unclosed<variant4>x</variant4>")
        if req.kind == "paraphrase":  # attempt 2 asks for the 2 still missing
            return "<variant1>In <image>, tally each shape of that kind.</variant1>"
        if req.kind == "steps":
            return "<step1>a</step1> \\boxed{0}"
        return "no tags, no box"  # revise

    teacher = ScriptedTeacher(reply)
    settings = AugmentSettings(k=3, attempts=2)
    results = augment_batch(teacher, records, _images(records), settings, seed=5)
    kinds = [r.kind for r in teacher.seen]
    assert kinds == ["paraphrase"] * 2 + ["steps"] * 2 + ["revise"] * 2 + ["paraphrase"] * 2 + ["steps"] * 2 \
        + ["revise"] * 2
    assert [r.count for r in teacher.seen if r.kind == "paraphrase"] == [3, 3, 2, 2]
    for res in results:
        counts = res.counts()
        assert counts["variants"] == {"kept": 2, "rejected": {"extra": 1, "malformed": 1, "missing": 1,
                                                               "near_copy": 1}}
        assert counts["think_steps"] == {"kept": 0, "rejected": {"no_answer": 2}}
        assert res.status(settings) == "partial"
    # turn 2 continues turn 1's conversation and is the only one told the answer
    revise = next(r for r in teacher.seen if r.kind == "revise")
    assert [role for role, _ in revise.turns] == ["user", "assistant", "user"]
    assert revise.turns[1][1] == "<step1>a</step1> \\boxed{0}"
    assert revise.turns[2][1].startswith(f"The correct answer to this question is: {revise.record.answer}\n")
    assert len(revise.images) == 1 and all(not r.images for r in teacher.seen if r.kind == "paraphrase")


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="k and attempts"):
        AugmentSettings(k=0)
    with pytest.raises(ValueError, match="min_steps"):
        AugmentSettings(min_steps=4, max_steps=3)
    with pytest.raises(ValueError, match="tasks"):
        AugmentSettings(tasks=("variants", "hints"))
