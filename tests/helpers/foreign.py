"""A LightningModule that is not ours: a toy 'answering' model used to show the callbacks are reusable.

Each training batch is a list of question ids. The module answers each question twice; its correctness is a
fixed table (q0 always right, q1 always wrong, q2 right once of two, q3 always right), so the expected
difficulty trajectory can be computed by hand. It returns the documented callback keys from `training_step`.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

CORRECT = {"q0": (1.0, 1.0), "q1": (0.0, 0.0), "q2": (1.0, 0.0), "q3": (1.0, 1.0)}


class Questions(Dataset):
    def __init__(self, ids: list[str], steps: int) -> None:
        self.ids, self.steps = ids, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> list[str]:
        return self.ids


class ForeignModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.difficulty_table = None

    def use_difficulty(self, table: object) -> None:
        self.difficulty_table = table  # DifficultyCallback hands its table here in setup

    def training_step(self, batch: list[str], batch_idx: int) -> dict:
        ids = [q for q in batch for _ in range(2)]
        acc = torch.tensor([CORRECT[q][j % 2] for j, q in enumerate(ids)])
        loss = self.layer(torch.ones(1, 2)).sum() * 0.0
        return {
            "loss": loss,
            "question_ids": ids,
            "accuracy": acc,
            "rewards": acc * 0.9 + 0.1,
            "prompt_ids": torch.arange(len(batch)).repeat_interleave(2),
            "family_ids": torch.arange(len(batch)).repeat_interleave(2),
            "is_original": torch.ones(len(ids), dtype=torch.bool),
            "tier": torch.ones(len(ids), dtype=torch.long),
            "timings": {"rollout": 0.5},
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(ids: list[str], steps: int) -> DataLoader:
    return DataLoader(Questions(ids, steps), batch_size=None)
