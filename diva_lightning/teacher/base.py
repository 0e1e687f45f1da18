"""The teacher contract: a batch of chat requests in, one reply text per request out.

A teacher is a component chosen by ``class_path`` (``--teacher``): :class:`~diva_lightning.teacher.hf.HFTeacher`
(any local Qwen2.5-VL-style checkpoint), :class:`~diva_lightning.teacher.vllm.VLLMTeacher` (GPU, optional
extra) or :class:`~diva_lightning.teacher.world.WorldTeacher` (the embedded world's own paraphrases and
steps, no model). Every teacher answers the same :class:`Request` objects with plain reply text, and
every reply goes through the same parsing and checks, so a programmatic teacher exercises the whole
pipeline.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from diva_lightning.data.schema import QuestionRecord

RequestKind = Literal["paraphrase", "steps", "revise", "solve"]
Role = Literal["user", "assistant"]


@dataclass(frozen=True)
class Request:
    """One conversation for the teacher to continue.

    Attributes:
        kind: what is asked: ``paraphrase`` (text only), ``steps`` (turn 1 of the think steps), ``revise``
            (turn 2, told the answer) or ``solve`` (answer a paraphrase, for ``--verify-paraphrases``).
        turns: ``(role, text)`` pairs, ending with a user turn.
        images: the images sent, ``[3, H, W]`` floats in [0, 1], one per ``<image>`` tag of the user turns.
            Empty: a text-only request, whose ``<image>`` tags are literal text for the teacher to copy.
        record: the question it is about (a programmatic teacher reads it; model teachers ignore it).
        count: how many items are asked for (``paraphrase``: the K in the prompt; else 1).
        problem: the problem text the request is about (``solve``: the paraphrase being verified).
    """

    kind: RequestKind
    turns: tuple[tuple[Role, str], ...]
    images: tuple[torch.Tensor, ...]
    record: QuestionRecord
    count: int = 1
    problem: str = ""

    def __post_init__(self) -> None:
        if not self.turns or self.turns[-1][0] != "user":
            raise ValueError("a request must end with a user turn")
        tags = sum(text.count("<image>") for role, text in self.turns if role == "user")
        if self.images and tags != len(self.images):
            raise ValueError(f"request for {self.record.id!r}: {len(self.images)} images for {tags} <image> tags")


class Teacher(ABC):
    """Produces reply texts for :class:`Request` batches. Subclasses are picked by ``class_path``."""

    @property
    @abstractmethod
    def teacher_id(self) -> str:
        """What made the replies (a checkpoint path or hub id, or a program name), for provenance."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """The sampling settings (JSON-serialisable), for provenance and for refusing to mix runs."""

    @abstractmethod
    def complete(self, requests: Sequence[Request], *, seed: int) -> list[str]:
        """One reply per request, in order. Deterministic given ``seed`` and the same batch of requests."""
