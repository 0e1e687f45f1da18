"""Start-up errors read as one line (issue 16: they used to sit inside 74-149 lines of chained tracebacks)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diva_lightning.cli import TRACEBACK_ENV, main

REPO = Path(__file__).resolve().parents[1]
FULL = str(REPO / "experiments/full.yaml")


@pytest.mark.parametrize(("override", "expected"), [
    (["--model.init_args.advantage.init_args.rrb", "rang"],
     "diva-lightning: ValueError: DivaAdvantage: rrb must be one of ['range', 'threshold', None], got 'rang'"),
    (["--model.init_args.reward.init_args.accuracy_fn", "nosuch.module:fn"],
     "diva-lightning: ImportError: cannot import module 'nosuch.module' for reward function 'nosuch.module:fn': "
     "no module named 'nosuch'"),
    (["--model.init_args.policy", "/nonexistent/Qwen2.5-VL-7B", "--build_base_policy", "false"],
     "diva-lightning: FileNotFoundError: policy '/nonexistent/Qwen2.5-VL-7B': no checkpoint directory at "
     "/nonexistent/Qwen2.5-VL-7B (not tried as a hub id: hub ids look like 'org/name')"),
])
def test_startup_errors_are_one_summary_line(override: list[str], expected: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", FULL, "--trainer.logger.init_args.save_dir", str(tmp_path), *override])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [expected, f"  (for the full traceback set {TRACEBACK_ENV}=1)"]


@pytest.mark.slow
def test_a_command_line_run_prints_no_spurious_warning(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "diva_lightning", "fit", "--config", FULL, "--print_config"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "args parameter is intended to run from within Python" not in done.stderr + done.stdout


def test_a_damaged_checkpoint_is_named_before_lightning_loads_it(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """LightningCLI torch.loads --ckpt_path right after parsing: a 0-byte file used to be a bare EOFError."""
    (tmp_path / "epoch=0-step=20.ckpt").write_bytes(b"PK\x03\x04 not a whole archive")
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["fit", "--config", FULL, "--ckpt_path", str(damaged)])
    err = capsys.readouterr().err
    assert f"cannot resume from checkpoint {damaged}: the file is empty (0 bytes)" in err
    assert "epoch=0-step=20.ckpt" in err  # the folder's other checkpoints are offered
