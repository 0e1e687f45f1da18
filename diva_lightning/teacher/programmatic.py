r"""The programmatic teacher for the embedded world: no model, the world's own paraphrases and steps.

It answers every :class:`~diva_lightning.teacher.base.Request` in the tagged format a model teacher is
asked for, from what the world itself knows about a question (``data.world.TEMPLATES``, ``solve`` and the
record's ``meta``), so the augment pipeline runs end to end on real parsing and real checks:

- ``paraphrase``: the family's paraphrase templates in a seeded order, ``<variantN>`` tagged;
- ``steps``: ``solve``'s steps and its answer, as a model would solve it;
- ``revise``: the same steps with the conclusion of the last step (its final clause, which states the
  answer: ``Total 7.``, ``so B.``) cut, as turn 2 asks; the answer is boxed after the steps;
- ``solve``: ``solve``'s answer, boxed.

The answers come from ``solve`` on the board in ``meta``, not from the record's ``answer``, so a record
with a wrong answer fails the checks like it would with a model. Records that are not world questions
(no ``family``/``cells`` in meta) are refused up front with their ids.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

from diva_lightning.data.world import TEMPLATES, solve
from diva_lightning.teacher.base import Request, Teacher
from diva_lightning.teacher.prompts import STEP_TAG, VARIANT_TAG

_CLAUSE_END = re.compile(r"(?<=[.,;])\s+")


def _tagged(tag: str, items: Sequence[str]) -> str:
    return "\n".join(f"<{tag}{n}>{text}</{tag}{n}>" for n, text in enumerate(items, start=1))


def _drop_conclusion(step: str) -> str:
    """The step without its final clause (``"blue circles: 1. Total 3."`` -> ``"blue circles: 1."``)."""
    clauses = _CLAUSE_END.split(step.strip())
    if len(clauses) < 2:
        return step
    return " ".join(clauses[:-1]).rstrip(",;.") + "."


class WorldTeacher(Teacher):
    """The embedded world's own paraphrases and think steps, in a model teacher's reply format."""

    @property
    def teacher_id(self) -> str:
        return "diva_lightning.teacher.WorldTeacher"

    def settings(self) -> dict[str, Any]:
        return {"kind": "programmatic"}

    def complete(self, requests: Sequence[Request], *, seed: int) -> list[str]:
        unknown = [r.record.id for r in requests if not {"family", "cells"} <= set(r.record.meta)]
        if unknown:
            raise ValueError(f"WorldTeacher only knows embedded-world records (meta 'family' and 'cells'); "
                             f"not: {', '.join(sorted(set(unknown)))}")
        return [self._reply(r, seed) for r in requests]

    def _reply(self, request: Request, seed: int) -> str:
        meta = request.record.meta
        answer, steps = solve(meta["family"], meta, meta["cells"])
        if request.kind == "paraphrase":
            a, b = meta.get("colors", ("", ""))
            fields = {k: v for k, v in meta.items() if k != "colors"}
            texts = [t.format(a=a, b=b, **fields) for t in TEMPLATES[meta["family"]][1:]]
            random.Random(f"{seed}:{request.record.id}").shuffle(texts)
            return _tagged(VARIANT_TAG, texts[:request.count])
        if request.kind == "revise":
            steps = [*steps[:-1], _drop_conclusion(steps[-1])]
        if request.kind in ("steps", "revise"):
            return f"{_tagged(STEP_TAG, steps)}\n\\boxed{{{answer}}}"
        return f"\\boxed{{{answer}}}"
