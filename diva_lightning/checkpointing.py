"""`AtomicCheckpointIO`: checkpoints that survive a kill at any moment, and a resume error that says what to do.

Why not Lightning's own writer. `TorchCheckpointIO` (Lightning 2.6) serialises into memory and writes through an
fsspec "transaction": the local filesystem's transaction writes a temp file made by `tempfile.mkstemp()` (in
`$TMPDIR`, not next to the checkpoint) and commits with `shutil.move`. When `$TMPDIR` is on another filesystem
(`/dev/shm`, a node-local `/tmp`), that move is a copy that truncates the destination first, so a kill during
the copy leaves `last.ckpt` empty or cut short; nothing is fsynced either. `ModelCheckpoint(save_last=True)`
writes `last.ckpt` as a second full save through the same writer (`save_last="link"` instead removes the old
link and then creates the new one: a kill in between leaves no `last.ckpt`).

This plugin writes ``.<name>.<random>.tmp`` in the checkpoint's own folder, fsyncs it, renames it over the
target with `os.replace` (atomic on POSIX within one filesystem) and fsyncs the folder. At every instant the
target is either the complete old file or the complete new one. A kill leaves at most a stray ``.tmp`` file,
removed by the next save of the same target. Remote paths (``s3://`` ...) go to Lightning's writer unchanged.

Loading wraps every failure (missing, 0-byte, truncated, corrupt file) in a :class:`CheckpointLoadError` that
names the path and lists the other checkpoints of its folder, newest first, to resume from instead.

Use it with ``trainer.plugins`` (see experiments/full.yaml)::

    trainer:
      plugins:
        - class_path: diva_lightning.checkpointing.AtomicCheckpointIO

It applies to the single-file checkpoints of the single-device, DDP and FSDP-full-state strategies; FSDP's
sharded checkpoints (a folder written by `torch.distributed.checkpoint`) do not go through a `CheckpointIO`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from typing_extensions import override

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


class CheckpointLoadError(RuntimeError):
    """A checkpoint that cannot be read; the message names it and the alternatives next to it."""


def _is_local(path: str | os.PathLike[str]) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _local(path: str | os.PathLike[str]) -> Path:
    text = str(path)
    return Path(text[len("file://"):] if text.startswith("file://") else text)


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable (POSIX); not every platform can open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}."


def other_checkpoints(path: str | os.PathLike[str]) -> list[Path]:
    """The other checkpoint files in ``path``'s folder, newest first (temp files and empty files excluded)."""
    target = _local(path)
    folder = target.parent
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.suffix in CHECKPOINT_SUFFIXES and not p.name.startswith(".") and p.is_file()
             and p.resolve() != target.resolve() and p.stat().st_size > 0]
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name), reverse=True)


def describe_alternatives(path: str | os.PathLike[str]) -> str:
    """A sentence offering the other checkpoints of ``path``'s folder (or saying there are none)."""
    others = other_checkpoints(path)
    if not others:
        return f"No other checkpoint in {_local(path).parent}."
    listed = "\n".join(f"  {p}  ({p.stat().st_size:,} bytes, {time.ctime(p.stat().st_mtime)})" for p in others)
    return f"Other checkpoints in {_local(path).parent}, newest first; resume from one with --ckpt_path:\n{listed}"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose writes are atomic and whose read errors name the file and the alternatives.

    Args:
        fsync: flush the file and its folder to disk before and after the rename (a power cut, not only a
            killed process, then leaves the old or the new file). Costs one disk flush per save.
    """

    def __init__(self, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = fsync

    def _write(self, checkpoint: dict[str, Any], f: IO[bytes]) -> None:
        """Serialise ``checkpoint`` into the open temp file (one place to change the format)."""
        torch.save(checkpoint, f)

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r})")
        target = _local(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f"{_tmp_prefix(target)}*.tmp"):  # left by a writer that was killed
            stale.unlink(missing_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_tmp_prefix(target), suffix=".tmp", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            _fsync_dir(target.parent)

    @override
    def load_checkpoint(self, path: Any, map_location: Callable[..., Any] | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        verify_checkpoint(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:  # bytes damaged inside a complete archive
            first = str(e).splitlines()[0] if str(e) else ""
            raise _load_error(_local(path), f"torch.load failed: {type(e).__name__}: {first}") from None


def _load_error(target: Path, reason: str) -> CheckpointLoadError:
    return CheckpointLoadError(f"cannot resume from checkpoint {target}: {reason}.\n{describe_alternatives(target)}")


def verify_checkpoint(path: str | os.PathLike[str]) -> None:
    """Cheap check that ``path`` is a whole ``torch.save`` archive (reads its zip directory, not its tensors).

    Catches a missing, empty or cut-off file and one that is not a checkpoint at all, raising
    :class:`CheckpointLoadError` with the path and the other checkpoints of its folder. A folder (a sharded
    checkpoint) and a remote path are left to their loaders. Call it before anything else loads the file
    (LightningCLI reads ``--ckpt_path`` for its hyperparameters before the Trainer's plugin sees it).
    """
    if not _is_local(path):
        return
    target = _local(path)
    if target.is_dir():
        return
    if not target.is_file():
        raise _load_error(target, "the file does not exist")
    size = target.stat().st_size
    if size == 0:
        raise _load_error(target, "the file is empty (0 bytes): probably cut off while being written")
    try:
        with zipfile.ZipFile(target) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise _load_error(target, f"the file ({size:,} bytes) is not a complete torch.save archive ({e}): probably cut "
                                  "off while being written, or not a checkpoint") from None
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        raise _load_error(target, f"the archive ({size:,} bytes) has no data.pkl record: not a torch checkpoint")
