"""The launcher: a cell's job is the template with its placeholders filled in, run by bash; the worker waits, reads
the metrics the job left in {run_dir}, and ends whatever the job left running. Jobs here are shell one-liners that
write a Lightning-shaped metrics.csv (a real fit per launcher is in test_ablate_runs.py: local and 2-node torchrun)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import pytest

from sweeps._common import Cell, TrialSettings
from sweeps.trial import LOCAL_LAUNCHER, check_launcher, launch_command, run_cell

SETTINGS = TrialSettings(steps=4, val_every=2, overrides=("--model.init_args.policy=/a b/c",))
# Lightning's CSV: validation rows carry step = steps done - 1
METRICS = "mkdir -p {run_dir} && printf 'step,val/accuracy\\n1,0.25\\n3,0.125\\n' > {run_dir}/metrics.csv"


def test_placeholders_are_filled_and_quoted() -> None:
    cmd = launch_command("{torchrun} --rdzv-endpoint localhost:{port} -m diva_lightning {args} # ${HOME} {x}",
                         args=["fit", "--model.init_args.policy=/a b/c"], run_dir=Path("/r"))
    words = shlex.split(cmd, comments=True)
    assert words[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert 1024 <= int(words[4].split(":")[1]) < 65536
    assert words[-2:] == ["fit", "--model.init_args.policy=/a b/c"]  # one word despite the space
    assert cmd.endswith("# ${HOME} {x}")  # other braces are the shell's
    assert launch_command(LOCAL_LAUNCHER, args=["fit"], run_dir=Path("/r")) == f"{shlex.quote(sys.executable)} " \
                                                                                 "-m diva_lightning fit"
    with pytest.raises(ValueError, match="has no {args}"):
        check_launcher("srun python -m diva_lightning fit")


def test_job_metrics_are_read_back(tmp_path: Path) -> None:
    result = run_cell(Cell("full", 1), SETTINGS, tmp_path, 7, launcher=METRICS + " && echo {args}")
    assert result.ok, result.error
    assert (result.final_accuracy, result.best_accuracy, result.steps) == (0.125, 0.25, 4)
    assert result.run_dir == str(tmp_path / "runs" / "full" / "seed1-t7")
    log = Path(result.log_path).read_text()
    assert log.startswith("$ mkdir -p ") and "--seed_everything 1" in log and "'--model.init_args.policy=/a b/c'" in log


def test_failed_job_reports_its_exit_code_and_log_tail(tmp_path: Path) -> None:
    result = run_cell(Cell("grpo", 0), SETTINGS, tmp_path, 0, launcher=": {args}; echo rank 1 died >&2; exit 3")
    assert not result.ok and result.error.startswith("job exited with code 3") and "rank 1 died" in result.error
    result = run_cell(Cell("grpo", 0), SETTINGS, tmp_path, 1, launcher=": {args}")  # exit 0, no metrics
    assert not result.ok and "metrics could not be read" in result.error


def test_processes_the_job_leaves_behind_are_ended(tmp_path: Path) -> None:
    pid_file = tmp_path / "straggler.pid"
    result = run_cell(Cell("full", 0), SETTINGS, tmp_path, 0,
                      launcher=f"sleep 60 & echo $! > {pid_file}; {METRICS}; : {{args}}")
    assert result.ok, result.error
    pid = int(pid_file.read_text())

    def alive() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie is dead, only not reaped yet
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 5
    while alive():
        assert time.monotonic() < deadline, "the job's background process outlived it"
        time.sleep(0.05)
