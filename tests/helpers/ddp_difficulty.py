"""Run the foreign module with 2-process CPU DDP (gloo); each rank sees different questions.

Writes, per rank, the difficulty table after every update to OUT/rank<r>.pt, and rank 0's logged metric names to
OUT/metrics0.pt. AdvantageMonitor runs too: only rank 1 sees q3, whose responses are marked as hint prompts, so
the per-kind metrics exist on one rank only (they must not deadlock the synchronised logging).
Usage: python ddp_difficulty.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diva_lightning.callbacks import AdvantageMonitor, DifficultyCallback  # noqa: E402
from tests.helpers.foreign import ForeignModule, loader  # noqa: E402


class Recorder(pl.Callback):
    def __init__(self, diff: DifficultyCallback) -> None:
        self.diff, self.snapshots = diff, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.snapshots.append(self.diff.table.as_dict())


def main(out: Path) -> None:
    diff = DifficultyCallback()
    rec = Recorder(diff)
    class KindModule(ForeignModule):
        def training_step(self, batch: list[str], batch_idx: int) -> dict:
            out = super().training_step(batch, batch_idx)
            ids = out["question_ids"]
            out["kind"] = torch.tensor([3 if q == "q3" else 0 for q in ids])
            return out

    module = KindModule()

    class Data(pl.LightningDataModule):
        def train_dataloader(self):  # type: ignore[no-untyped-def]
            rank = self.trainer.global_rank
            return loader(["q0", "q2"] if rank == 0 else ["q1", "q3", "q2"], steps=3)

    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[diff, rec, AdvantageMonitor()], use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data())
    torch.save(rec.snapshots, out / f"rank{trainer.global_rank}.pt")
    if trainer.global_rank == 0:
        torch.save(sorted(trainer.callback_metrics), out / "metrics0.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
