"""Checkpoints that survive a kill at any moment, and resume errors that name the file (issue 16 item 3).

Fast: the writer on its own: its temp file is next to the target whatever $TMPDIR is; 0-byte, truncated,
corrupt, missing and non-torch files are errors naming the path and the alternatives.
Slow: a writer SIGKILLed mid-save leaves the old file intact; a real `python -m diva_lightning fit` SIGKILLed in
the middle of writing `last.ckpt`, with $TMPDIR on the same filesystem and on another one (/dev/shm), resumes
with --ckpt_path to the end; the Trainer refuses a damaged checkpoint before any step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from diva_lightning.cli import run_cli
from diva_lightning.system.checkpointing import AtomicCheckpointIO, CheckpointLoadError, verify_checkpoint

REPO = Path(__file__).resolve().parents[1]


def _state(step: int) -> dict[str, object]:
    return {"global_step": step, "weights": torch.arange(20_000, dtype=torch.float32) + step}


class _Output:
    """Collects a subprocess's combined output on a thread, so a test can wait for a line while it runs."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc, self.lines = proc, []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                tail = "".join(self.lines)[-4000:]
                raise AssertionError(f"no {text!r} before exit ({self.proc.returncode}) or timeout:\n{tail}")
            time.sleep(0.05)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.thread.join(timeout=30)


def _tmp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_save_writes_next_to_the_target_whatever_tmpdir_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "tmpdir"
    elsewhere.mkdir()
    monkeypatch.setenv("TMPDIR", str(elsewhere))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    io = AtomicCheckpointIO()
    target = tmp_path / "ckpt" / "last.ckpt"
    io.save_checkpoint(_state(1), target)
    io.save_checkpoint(_state(2), target)  # overwrite
    assert list(elsewhere.iterdir()) == []
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    loaded = io.load_checkpoint(target)
    assert loaded["global_step"] == 2 and torch.equal(loaded["weights"], _state(2)["weights"])
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(_state(3), target, storage_options={"x": 1})


@pytest.mark.slow  # a subprocess importing Lightning: ~10 s on 2 busy cores
def test_a_writer_killed_mid_save_leaves_the_previous_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import torch
        from tests.helpers.slow_checkpoint import StallingCheckpointIO
        io = StallingCheckpointIO(stall_on_save=2, stall_s=120)
        state = lambda s: {{"global_step": s, "weights": torch.arange(20_000, dtype=torch.float32) + s}}
        io.save_checkpoint(state(1), {str(target)!r})
        io.save_checkpoint(state(2), {str(target)!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    output = _Output(proc)
    output.wait_for("save 2 stalled", timeout=120)
    output.kill()
    (stale,) = _tmp_files(tmp_path)
    assert stale.name.startswith(".last.ckpt.")
    io = AtomicCheckpointIO()
    assert io.load_checkpoint(target)["global_step"] == 1  # the old file, complete
    io.save_checkpoint(_state(3), target)  # the next save of the same target removes the stray temp file
    assert _tmp_files(tmp_path) == [] and io.load_checkpoint(target)["global_step"] == 3


@pytest.mark.parametrize("damage", ["empty", "truncated", "corrupt", "missing", "not_torch"])
def test_a_damaged_checkpoint_is_an_error_naming_it_and_offering_the_others(tmp_path: Path, damage: str) -> None:
    io = AtomicCheckpointIO(fsync=False)
    good = tmp_path / "epoch=0-step=2.ckpt"
    io.save_checkpoint(_state(2), good)
    bad = tmp_path / "last.ckpt"
    io.save_checkpoint(_state(3), bad)
    data = bad.read_bytes()
    if damage == "missing":
        bad.unlink()
    elif damage == "not_torch":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("readme.txt", "a zip, but not a checkpoint")
    else:
        bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "corrupt": os.urandom(len(data))}[damage])
    size = f"{bad.stat().st_size:,}" if bad.exists() else ""
    reason = {"empty": "the file is empty (0 bytes): probably cut off while being written",
              "missing": "the file does not exist",
              "truncated": f"the file ({size} bytes) is not a complete torch.save archive (File is not a zip file)",
              "corrupt": f"the file ({size} bytes) is not a complete torch.save archive (File is not a zip file)",
              "not_torch": f"the archive ({size} bytes) has no data.pkl record: not a torch checkpoint"}[damage]
    for attempt in (lambda: io.load_checkpoint(bad), lambda: verify_checkpoint(bad)):
        with pytest.raises(CheckpointLoadError) as info:
            attempt()
        message = str(info.value)
        assert message.startswith(f"cannot resume from checkpoint {bad}: {reason}"), message
        assert f"resume from one with --ckpt_path:\n  {good}  (" in message
        assert len(message.splitlines()) == 3  # what, the offer, one alternative: no torch traceback text
    verify_checkpoint(good)  # a whole checkpoint passes
    verify_checkpoint(tmp_path)  # a folder (sharded checkpoint) is left to its loader


# ------------------------------------------------------------------------------------------- real fit, slow
def _fit_args(policy: str, root: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "diva_lightning", "fit", "--config", str(REPO / "experiments/full.yaml"),
            "--model.init_args.policy", policy, "--build_base_policy", "false",
            "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.logger.init_args.name", "run", "--trainer.logger.init_args.version", "0",
            "--trainer.callbacks.every_n_train_steps", "1",
            "--data.init_args.questions_per_step", "2", "--data.init_args.world.train_size", "16",
            "--model.init_args.num_generations", "2", "--model.init_args.train_sampling.max_new_tokens", "6",
            *extra]


def _env(tmpdir: Path) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmpdir), OMP_NUM_THREADS="1")


def _step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


@pytest.fixture(params=["same_fs", "dev_shm"])
def tmpdir_on(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """$TMPDIR for the run: on the checkpoints' filesystem, or on /dev/shm (removed afterwards)."""
    if request.param == "same_fs":
        (tmp_path / "tmp").mkdir()
        yield tmp_path / "tmp"
        return
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    other = Path(tempfile.mkdtemp(prefix="diva-ckpt-", dir="/dev/shm"))
    try:
        yield other
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.slow
def test_fit_killed_while_writing_last_ckpt_resumes(tiny_policy_dir: str, tmp_path: Path, tmpdir_on: Path) -> None:
    tmpdir = tmpdir_on
    ckpt_dir = tmp_path / "run" / "version_0" / "checkpoints"
    # Saves per step: epoch=0-step=N.ckpt, then last.ckpt. Save 6 is step 3's last.ckpt: stall halfway, SIGKILL.
    stall = json.dumps([{"class_path": "tests.helpers.slow_checkpoint.StallingCheckpointIO",
                         "init_args": {"stall_on_save": 6, "stall_s": 300}}])
    proc = subprocess.Popen(_fit_args(tiny_policy_dir, tmp_path, 4, f"--trainer.plugins={stall}"), cwd=REPO,
                            env=_env(tmpdir), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = _Output(proc)
    try:
        output.wait_for("save 6 stalled", timeout=400)
    finally:
        output.kill()
    (stale,) = _tmp_files(ckpt_dir)
    assert stale.name.startswith(".last.ckpt.") and stale.stat().st_size > 0
    assert list(tmpdir.iterdir()) == []  # nothing was written through $TMPDIR
    # Two complete step checkpoints and a complete last.ckpt (the one from step 2) survived the kill.
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt",
                                                                "last.ckpt"]
    assert _step(ckpt_dir / "last.ckpt") == 2 and _step(ckpt_dir / "epoch=0-step=3.ckpt") == 3

    done = subprocess.run(_fit_args(tiny_policy_dir, tmp_path, 4, "--ckpt_path", str(ckpt_dir / "last.ckpt")),
                          cwd=REPO, env=_env(tmpdir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _step(ckpt_dir / "last.ckpt") == 4 and _tmp_files(ckpt_dir) == []
    # Step 3 was trained again (last.ckpt was from step 2) and saved under Lightning's version suffix; the killed
    # run's step-3 file is not in the resumed ModelCheckpoint's state, so it stays (harmless, complete).
    assert sorted(p.name for p in ckpt_dir.glob("*.ckpt")) == ["epoch=0-step=3-v1.ckpt", "epoch=0-step=3.ckpt",
                                                                "epoch=0-step=4.ckpt", "last.ckpt"]
    if tmpdir != tmp_path / "tmp":
        return  # the damaged-file case below does not depend on $TMPDIR
    # A damaged file is refused by the real Trainer with its path and the alternatives, before any training step.
    # (Through `python -m diva_lightning fit --ckpt_path`, LightningCLI reads the file for its hyperparameters
    # before the Trainer does: the CLI must call verify_checkpoint first.)
    (ckpt_dir / "last.ckpt").write_bytes(b"")
    cli = run_cli(_fit_args(tiny_policy_dir, tmp_path / "again", 5)[4:], run=False)
    with pytest.raises(CheckpointLoadError) as info:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert str(info.value).startswith(f"cannot resume from checkpoint {ckpt_dir / 'last.ckpt'}: the file is empty")
    assert f"resume from one with --ckpt_path:\n  {ckpt_dir / 'epoch=0-step=4.ckpt'}  (" in str(info.value)
    assert cli.trainer.global_step == 0


def test_a_checkpoint_recording_a_renamed_word_resumes_under_the_new_one() -> None:
    """`prompt_overflow: error` is `raise` now: a checkpoint that records the old word is the same run."""
    from diva_lightning.system.checkpointing import RUN_SETTINGS_KEY, ChangedSettingsError, check_resume_settings

    key = "model.init_args.policy_config.prompt_overflow"
    checkpoint = {RUN_SETTINGS_KEY: {key: "error", "seed_everything": 0}}
    check_resume_settings(checkpoint, {key: "raise", "seed_everything": 0}, "old.ckpt")
    with pytest.raises(ChangedSettingsError, match=f"{key}: checkpoint 'raise', now 'skip'"):
        check_resume_settings(checkpoint, {key: "skip", "seed_everything": 0}, "old.ckpt")


def test_a_checkpoint_recording_a_moved_class_resumes_under_its_new_path() -> None:
    """Issue 24 moved the module, the data module and the estimators: a checkpoint written before records their old
    class paths, which name the same classes; a different class is still a difference."""
    from diva_lightning.system.checkpointing import (
        FORMER_MODULES,
        RUN_SETTINGS_KEY,
        ChangedSettingsError,
        check_resume_settings,
    )

    def former(path: str) -> str:  # the old paths are built, not written: they name no class today
        old_prefix, new_prefix = next((o, n) for o, n in FORMER_MODULES.items() if path.startswith(n))
        return old_prefix + path[len(new_prefix):]

    now = {"model.class_path": "diva_lightning.system.module.DivaGRPOModule",
           "data.class_path": "diva_lightning.system.datamodule.DivaDataModule",
           "model.init_args.advantage.class_path": "diva_lightning.training.estimators.DivaAdvantage",
           "seed_everything": 0}
    old = {k: former(v) if k.endswith("class_path") else v for k, v in now.items()}
    assert old["model.class_path"] == "diva_lightning." + "module.DivaGRPOModule"
    check_resume_settings({RUN_SETTINGS_KEY: old}, now, "old.ckpt")
    grpo = {**now, "model.init_args.advantage.class_path": "diva_lightning.training.estimators.GRPOAdvantage"}
    with pytest.raises(ChangedSettingsError, match="advantage.class_path: checkpoint "
                                                   "'diva_lightning.training.estimators.DivaAdvantage'"):
        check_resume_settings({RUN_SETTINGS_KEY: old}, grpo, "old.ckpt")
