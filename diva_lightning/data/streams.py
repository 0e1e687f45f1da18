"""The question streams: the training order (seeded, resumable by position) and the evaluation shards.

Training batch k of pass e is a slice of a permutation seeded by (stream, seed, e), cut per rank: deterministic in
(seed, stream, position, rank), so a resumed run continues with the next unseen batch. Evaluation records are
dealt out to the ranks by :func:`eval_shard`, every rank running the same number of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import IterableDataset

from diva_lightning.core.seeding import stable_seed
from diva_lightning.data.batch import QuestionBatch
from diva_lightning.data.images import ImageStore
from diva_lightning.data.schema import QuestionRecord


@dataclass
class QuestionOrder:
    """The training questions in seeded order, ``per_rank`` questions per rank and batch.

    Attributes:
        images: decoded images of the records.
        per_rank: B, questions per batch on each rank.
        seed: seed of the order.
        records: the training questions (filled when loaded).
    """

    images: ImageStore
    per_rank: int
    seed: int
    records: list[QuestionRecord] = field(default_factory=list)

    def batches_per_epoch(self, world_size: int) -> int:
        """Whole batches of all ranks in one pass over the records."""
        return len(self.records) // (self.per_rank * world_size)

    def batch(self, position: int, *, rank: int, world_size: int, stream: str = "order") -> QuestionBatch:
        """This rank's questions of global batch ``position`` of ``stream`` ("order": the training stream; "extra":
        the questions dynamic sampling draws on top)."""
        epoch, k = divmod(position, self.batches_per_epoch(world_size))
        g = torch.Generator().manual_seed(stable_seed(stream, self.seed, epoch))
        order = torch.randperm(len(self.records), generator=g)
        start = k * self.per_rank * world_size + rank * self.per_rank
        idx = order[start : start + self.per_rank].tolist()
        recs = [self.records[i] for i in idx]
        return QuestionBatch(recs, [self.images.get(r) for r in recs], position=position)


class TrainStream(IterableDataset[QuestionBatch]):
    """Yields QuestionBatches from ``start()`` (read when iteration begins) to the end of that pass.

    Args:
        batch: position -> that batch (this rank's).
        start: the position to resume from (batches consumed).
        per_epoch: batches per pass.
    """

    def __init__(self, batch: Callable[[int], QuestionBatch], start: Callable[[], int],
                 per_epoch: Callable[[], int]) -> None:
        self.batch, self.start, self.per_epoch = batch, start, per_epoch

    def __len__(self) -> int:
        return self.per_epoch()

    def __iter__(self) -> Iterator[QuestionBatch]:
        start, per_epoch = self.start(), self.per_epoch()
        epoch_end = (start // per_epoch + 1) * per_epoch
        for position in range(start, epoch_end):
            yield self.batch(position)


def eval_shard(num_records: int, batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], bool]]:
    """This rank's evaluation batches as (record indices, padding) pairs.

    Record i belongs to rank i % world_size, and every rank runs the same number of batches: as many as the longest
    shard needs at ``batch_size`` (sharded generation steps all ranks together, so a rank with one batch fewer would
    leave the others waiting). Each shard is split into that many batches of nearly equal size; a rank whose shard
    is shorter than that gets a padding batch (one record, evaluated and dropped) in place of an empty one.
    """
    if num_records == 0:
        return []
    shard = list(range(rank, num_records, world_size))
    longest = -(-num_records // world_size)
    count = -(-longest // batch_size)
    size, extra = divmod(len(shard), count)
    out: list[tuple[list[int], bool]] = []
    start = 0
    for k in range(count):
        n = size + (k < extra)
        out.append((shard[start : start + n], False) if n else ([shard[0] if shard else 0], True))
        start += n
    return out


class EvalStream(IterableDataset[QuestionBatch]):
    """This rank's batches of one evaluation source (`eval_shard`). Iterable, so Lightning injects no sampler of its
    own (a DistributedSampler would shard the shard again and repeat records to even the ranks out)."""

    def __init__(self, images: ImageStore, records: list[QuestionRecord], batches: list[tuple[list[int], bool]]
                 ) -> None:
        self.images, self.records, self.batches = images, records, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[QuestionBatch]:
        for k, (idx, padding) in enumerate(self.batches):
            recs = [self.records[i] for i in idx]
            yield QuestionBatch(recs, [self.images.get(r) for r in recs], position=k, padding=padding)
