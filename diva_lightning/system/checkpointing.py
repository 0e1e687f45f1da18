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
        - class_path: diva_lightning.system.checkpointing.AtomicCheckpointIO

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

from diva_lightning.training.config import FORMER_WORDS

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


# ------------------------------------------------------------------------------------------ run settings (issue 22)
RUN_SETTINGS_KEY = "diva_run_settings"
ALLOW_SWITCH = "--allow_changed_settings true"
# Settings a resume may change freely: they do not change what a training round computes (evaluation decoding and
# sources, memory knobs).
NOT_RUN_DEFINING = (
    "model.init_args.val_sampling",
    "model.init_args.micro_batch_size",
    "model.init_args.policy_config.gradient_checkpointing",
    # memory and speed only: the padded and packed layouts give equal losses and gradients (tests), and the engine's
    # memory settings do not change what it samples; a resume after an out-of-memory error may change them
    "model.init_args.policy_config.padding_free",
    "model.init_args.policy_config.max_tokens_per_micro_batch",
    "model.init_args.policy_config.attn_implementation",
    "model.init_args.policy_config.share_prompt",
    "model.init_args.rollout.init_args.gpu_memory_utilization",
    "model.init_args.rollout.init_args.cpu_kv_cache_gib",
    "model.init_args.rollout.init_args.sleep_mode",
    "data.init_args.val_source",
    "data.init_args.test_source",
    "data.init_args.predict_source",
    "data.init_args.val_batch_size",
)
_MISSING = object()


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def run_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The settings that define a training run, flattened to ``dotted.key -> value``, from one subcommand's config
    as LightningCLI dumps it: the seed, every model and data setting (estimator, reward, rollout engine, loss, G,
    sampling, plan, data; a component as its class_path and init_args), the trainer's precision and process count,
    and the difficulty callbacks (the difficulty rule is part of the algorithm). Keys in `NOT_RUN_DEFINING` are left
    out. Plain Python values only, so the record loads with ``torch.load(weights_only=True)``."""
    picked: dict[str, Any] = {
        "seed_everything": config.get("seed_everything"),
        "model": config.get("model"),
        "data": config.get("data"),
    }
    trainer = config.get("trainer") or {}
    for key in ("precision", "devices", "num_nodes", "accumulate_grad_batches"):
        picked[f"trainer.{key}"] = trainer.get(key)
    callbacks = trainer.get("callbacks") or []
    for cb in callbacks if isinstance(callbacks, list) else [callbacks]:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("DifficultyCallback"):
            picked["trainer.callbacks.DifficultyCallback"] = cb.get("init_args") or {}
    picked.setdefault("trainer.callbacks.DifficultyCallback", None)
    flat: dict[str, Any] = {}
    for key, value in picked.items():
        _flatten(value, key, flat)
    return {k: v for k, v in flat.items()
            if not any(k == skip or k.startswith(skip + ".") for skip in NOT_RUN_DEFINING)}


def settings_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One line per setting whose value differs between a checkpoint's record and the current config."""
    keys = sorted(set(recorded) | set(current))
    # a component whose class differs: its init_args differ as a consequence (one line, not one per argument)
    swapped = [k[: -len("class_path")] for k in keys
               if k.endswith(".class_path") and recorded.get(k, _MISSING) != current.get(k, _MISSING)]
    # a group set on one side and null on the other (e.g. the DifficultyCallback, or dynamic_sampling)
    grouped: dict[str, tuple[Any, Any]] = {}
    for key in keys:
        for mine, other in ((recorded, current), (current, recorded)):
            if mine.get(key, _MISSING) is None and any(k.startswith(key + ".") for k in other):
                sub = {k[len(key) + 1:]: v for k, v in other.items() if k.startswith(key + ".")}
                grouped[key] = (None, sub) if mine is recorded else (sub, None)
    lines = [f"  {key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in grouped.items()]
    for key in keys:
        if any(key.startswith(p + "init_args.") for p in swapped) or key in grouped \
                or any(key.startswith(g + ".") for g in grouped):
            continue
        old, new = recorded.get(key, _MISSING), current.get(key, _MISSING)
        if old == new:
            continue
        if old is _MISSING and new is None or new is _MISSING and old is None:
            continue  # a key only one side spells out, null on the other
        shown = ["(not set)" if v is _MISSING else repr(v) for v in (old, new)]
        lines.append(f"  {key}: checkpoint {shown[0]}, now {shown[1]}")
    return sorted(lines)


# Where a component's class lived before the house was rearranged (issue 24): a checkpoint records the old class
# path, which names the same class today.
FORMER_MODULES = {
    "diva_lightning.module.": "diva_lightning.system.module.",
    "diva_lightning.data.datamodule.": "diva_lightning.system.datamodule.",
    "diva_lightning.algorithms.": "diva_lightning.training.estimators.",
    "diva_lightning.checkpointing.": "diva_lightning.system.checkpointing.",
    "diva_lightning.warmup.": "diva_lightning.system.warmup.",
    "diva_lightning.benchmarks.": "diva_lightning.evaluation.",
}


def current_words(recorded: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's record with the words an option has since renamed read as today's (``prompt_overflow:
    error`` is ``raise`` now, `training.config.FORMER_WORDS`) and the class paths of moved components read at their
    new place (`FORMER_MODULES`): the same setting, so not a difference."""
    def now(key: str, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if key == "class_path" or key.endswith(".class_path"):
            for old, new in FORMER_MODULES.items():
                if value.startswith(old):
                    return new + value[len(old):]
        words = FORMER_WORDS.get(key.rsplit(".", 1)[-1], {})
        return words.get(value, value)

    return {key: now(key, value) for key, value in recorded.items()}


class ChangedSettingsError(ValueError):
    """A resume whose configuration differs from the one the checkpoint was trained with."""


def check_resume_settings(checkpoint: dict[str, Any], current: dict[str, Any], path: Any) -> None:
    """Refuse to resume from ``checkpoint`` (loaded from ``path``) when ``current`` differs from its record, naming
    each difference and the switch that allows it; a checkpoint without a record is refused the same way."""
    recorded = checkpoint.get(RUN_SETTINGS_KEY)
    if recorded is None:
        raise ChangedSettingsError(
            f"cannot resume from {path}: the checkpoint records no run settings (written before diva-lightning "
            f"recorded them, or not through `python -m diva_lightning fit`), so a changed setting could not be "
            f"detected. Pass {ALLOW_SWITCH} to resume with the current config anyway.")
    diffs = settings_differences(current_words(recorded), current)
    if diffs:
        raise ChangedSettingsError(
            f"cannot resume from {path}: {len(diffs)} setting(s) differ from the run that wrote it (the resumed run "
            "would silently be a different algorithm):\n" + "\n".join(diffs) + "\nGive the original run's config "
            f"(its config.yaml is next to its checkpoints), or pass {ALLOW_SWITCH} to resume with the new settings.")


def load_lazily(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A local checkpoint's entries with its tensors memory-mapped, not read (cheap for a 7B checkpoint)."""
    return torch.load(_local(path), map_location="cpu", weights_only=True, mmap=True)
