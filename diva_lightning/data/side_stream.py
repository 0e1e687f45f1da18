"""The dynamic-sampling side stream: more question families on demand, from a stream of its own.

DAPO's dynamic sampling draws extra questions until a batch holds enough groups with reward spread. Those draws
come from :class:`SideStream`, which owns its position: the training stream's position is untouched, and a resumed
run (the position is saved with the data module's state) draws the same questions as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diva_lightning.data.batch import FamilyBatch, QuestionBatch
from diva_lightning.data.perturb import apply_perturbations


class SideStream:
    """Draws batches of question families for dynamic sampling, ready for the policy.

    Args:
        questions: position -> this rank's questions of that batch of the side stream's own order.
        families: questions -> their planned family batch (on the host, images not yet perturbed).

    Attributes:
        position: batches drawn so far (the data module saves it in its state).
    """

    def __init__(self, questions: Callable[[int], QuestionBatch],
                 families: Callable[[QuestionBatch], FamilyBatch]) -> None:
        self._questions, self._families = questions, families
        self.position = 0

    def draw(self, device: torch.device | str) -> FamilyBatch:
        """The next batch: planned, on ``device``, images perturbed.

        Its position is kept negative in the batch (-1, -2, ...), so its plans and noise never repeat a training
        batch's.
        """
        qb = self._questions(self.position)
        qb = QuestionBatch(qb.records, qb.images, position=-(1 + self.position))
        self.position += 1
        batch = self._families(qb).to(device)
        batch.images = apply_perturbations(batch.images, batch.perturb)
        return batch
