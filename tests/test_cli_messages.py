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


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "usage:" not in captured.err + captured.out  # no usage dump (issue 22: 53 lines of it)
    return captured.err.strip().splitlines()


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "warmup", "score", "augment"):
        assert any(line.split()[:1] == [command] and len(line.split()) > 2 for line in out.splitlines()), command


def test_an_error_in_a_config_file_names_the_file_and_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    bad = tmp_path / "overlay.yaml"
    bad.write_text("model:\n  init_args:\n    advantage:\n      init_args:\n        k: abc\n")
    err = _one_line_error(["fit", "--config", FULL, "--config", str(bad)], capsys)
    assert err[0] == (f"diva-lightning: config file {bad}: key model.init_args.advantage.init_args.k: Expected a "
                      "<class 'float'>. Got value: abc")
    # the same value on the command line is named as the option
    err = _one_line_error(["fit", "--config", FULL, "--model.init_args.num_generations", "abc"], capsys)
    assert err[0] == "diva-lightning: --model.init_args.num_generations: Expected a <class 'int'>. Got value: abc"


@pytest.mark.parametrize(("override", "expected"), [
    (["--data.init_args.batch_size", "0"],
     "diva-lightning: --data.init_args.batch_size: 'batch_size' is not an option (did you mean questions_per_step "
     "(questions per training round) or val_batch_size (questions per validation batch)?)"),
    (["--trainer.max_steps", "-1"],
     "diva-lightning: ValueError: trainer.max_steps must be >= 0 (the number of training rounds), got -1: -1 with "
     "trainer.max_epochs unset would run Lightning's default of 1000 epochs; set trainer.max_epochs for an "
     "epoch-bounded run"),
    (["--trainer.val_check_interval", "0"],
     "diva-lightning: ValueError: trainer.val_check_interval must be >= 1, got 0"),
])
def test_counts_that_make_no_sense_are_refused_naming_the_option(override: list[str], expected: str, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    err = _one_line_error(["fit", "--config", FULL, "--trainer.logger.init_args.save_dir", str(tmp_path),
                           *override], capsys)
    assert err[0] == expected


@pytest.mark.parametrize(("override", "expected"), [
    # a choice is typed with core.choices' Literal: refused while parsing, naming the option and every word
    (["--model.init_args.advantage.init_args.rrb", "rang"],
     "diva-lightning: --model.init_args.advantage.init_args.rrb: must be one of range, threshold or null, got 'rang'"),
    (["--model.init_args.loss.agg", "mean"],
     "diva-lightning: --model.init_args.loss.agg: must be one of token_mean, seq_mean_token_mean, "
     "seq_mean_token_sum_norm, got 'mean'"),
    # a word an option no longer takes says what it is called now (one word for a bad input: raise | skip)
    (["--model.init_args.policy_config.prompt_overflow", "error"],
     "diva-lightning: --model.init_args.policy_config.prompt_overflow: 'error' is now called 'raise' (the word "
     "every option for a bad input uses)"),
])
def test_a_bad_choice_is_one_line_naming_the_option_and_the_words(override: list[str], expected: str,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    assert _one_line_error(["fit", "--config", FULL, *override], capsys)[0] == expected


def test_a_former_word_in_a_config_file_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    old = tmp_path / "old.yaml"
    old.write_text("model:\n  init_args:\n    policy_config:\n      prompt_overflow: error\n")
    err = _one_line_error(["fit", "--config", FULL, "--config", str(old)], capsys)
    assert err[0] == (f"diva-lightning: config file {old}: key model.init_args.policy_config.prompt_overflow: "
                      "'error' is now called 'raise' (the word every option for a bad input uses)")


def test_the_package_ships_the_warmup_recipe_users_read() -> None:
    """The embedded base policy is built from the package's recipe (an installed package has no experiments/);
    experiments/warmup.yaml is that recipe for users, kept equal here."""
    from diva_lightning.system.warmup import WARMUP_RECIPE

    assert WARMUP_RECIPE.read_bytes() == (REPO / "experiments/warmup.yaml").read_bytes()
