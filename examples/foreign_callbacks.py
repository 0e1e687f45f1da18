"""DIVA's callbacks in a LightningModule of your own (README: "Callbacks in your own Lightning project").

A toy model answers each question twice with fixed correctness. Run it: python examples/foreign_callbacks.py
"""

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from diva_lightning.callbacks import AdvantageMonitor, DifficultyCallback

RIGHT = {"q0": [1.0, 1.0], "q1": [0.0, 0.0], "q2": [1.0, 0.0]}  # each question's 2 answers: 1 right, 0 wrong


class Questions(pl.LightningDataModule):
    def __init__(self, batches: int = 6) -> None:
        super().__init__()
        self.batches = batches
        self.difficulty_table = None

    def use_difficulty(self, table: object) -> None:
        self.difficulty_table = table  # DifficultyCallback hands its live table here in setup

    def initial_difficulties(self) -> dict[str, float]:
        return {"q2": 8.0}  # q2 starts at 8, the others at DifficultyCallback(initial=5.0)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([list(RIGHT)] * self.batches, batch_size=None)  # every batch: all three questions


class Answerer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.difficulty_table = None

    def use_difficulty(self, table: object) -> None:
        self.difficulty_table = table  # ... and here too

    def training_step(self, batch: list[str], batch_idx: int) -> dict:
        accuracy = torch.tensor([a for q in batch for a in RIGHT[q]])  # [N]: N = 2 responses x 3 questions
        return {
            "loss": self.layer(accuracy[:, None]).pow(2).mean(),
            "question_ids": [q for q in batch for _ in RIGHT[q]],  # list[str] [N]: the question each answers
            "accuracy": accuracy,  # [N] 0/1 (or fractions): DifficultyCallback's statistic
            "rewards": 0.9 * accuracy + 0.1,  # [N] or [P, G]: AdvantageMonitor's required key
            "prompt_ids": torch.arange(len(batch)).repeat_interleave(2),  # [N]: the local group of each response
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(**trainer_kwargs: object) -> DifficultyCallback:
    difficulty = DifficultyCallback(eta=0.5)  # linear rule: D <- D + eta * (0.5 - accuracy), in [1, 9]
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, callbacks=[difficulty, AdvantageMonitor()],
                         enable_progress_bar=False, **trainer_kwargs)  # type: ignore[arg-type]
    trainer.fit(Answerer(), datamodule=Questions())
    return difficulty


if __name__ == "__main__":
    print(main(logger=False, enable_checkpointing=False).table.as_dict())  # {'q2': 8.0, 'q0': 3.5, 'q1': 6.5}
