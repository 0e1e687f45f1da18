"""A checkpoint writer that stalls in the middle of one save, so a test can SIGKILL a run during the write.

It is the real `AtomicCheckpointIO` with its serialisation step split: the first half of the bytes is written
and flushed to the temp file, then the process sleeps (where the test kills it), then the rest is written.
"""

from __future__ import annotations

import io
import sys
import time
from typing import IO, Any

import torch

from diva_lightning.system.checkpointing import AtomicCheckpointIO


class StallingCheckpointIO(AtomicCheckpointIO):
    """Stalls for ``stall_s`` seconds halfway through save number ``stall_on_save`` (1-based)."""

    def __init__(self, stall_on_save: int = 1, stall_s: float = 120.0, fsync: bool = True) -> None:
        super().__init__(fsync=fsync)
        self.stall_on_save, self.stall_s, self.saves = stall_on_save, stall_s, 0

    def _write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        self.saves += 1
        if self.saves != self.stall_on_save:
            super()._write(checkpoint, f)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        print(f"[stalling-checkpoint] save {self.saves} stalled after {len(data) // 2} of {len(data)} bytes",
              file=sys.stderr, flush=True)
        time.sleep(self.stall_s)
        f.write(data[len(data) // 2 :])
