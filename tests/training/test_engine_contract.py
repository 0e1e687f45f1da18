"""The engine contract keeps training on-policy (issue 11 item 3), through the real CLI and tiny model.

`CopyEngine` (tests/helpers/engines.py) is the CPU stand-in for vLLM: it samples with its own copy of the weights
and returns its own log-probs. The system must sync it after every optimizer step, re-score old log-probs itself,
and, with `rollout_correction`, measure and correct the engine/trainer mismatch.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from diva_lightning.cli import run_cli
from tests.test_module import small_args

CORRECTION = ["--model.init_args.rollout_correction.level", "token", "--model.init_args.rollout_correction.mode",
              "truncate", "--model.init_args.rollout_correction.cap", "3.0"]


def _rows(cli: object) -> list[dict[str, str]]:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[attr-defined]
        return [r for r in csv.DictReader(f) if r.get("reward")]


def _engine_args(stale: bool) -> list[str]:
    return ["--model.init_args.rollout", "tests.helpers.engines.CopyEngine",
            "--model.init_args.rollout.init_args.stale", str(stale).lower(), *CORRECTION]


def test_synced_engine_matches_the_trainer(tiny_policy_dir: str, tmp_path: Path) -> None:
    cli = run_cli(small_args(tiny_policy_dir, tmp_path, *_engine_args(stale=False), steps=3))
    assert cli.model.engine.syncs == 4  # told at fit start (restored weights), then after every optimizer step
    rows = _rows(cli)
    assert len(rows) == 3
    for row in rows:
        # same weights: the only difference is generate's KV-cache numerics
        assert float(row["rollout_correction/logp_diff_max"]) < 1e-4
        assert float(row["rollout_correction/ratio_mean"]) == pytest.approx(1.0, abs=1e-4)


def test_stale_engine_mismatch_is_measured_and_corrected(tiny_policy_dir: str, tmp_path: Path) -> None:
    """An engine that keeps sampling from the initial weights: the trainer re-scores old log-probs under the
    current weights (no old = current shortcut), and the correction weights the stale samples."""
    cli = run_cli(small_args(tiny_policy_dir, tmp_path, *_engine_args(stale=True), steps=3))
    rows = _rows(cli)
    assert float(rows[0]["rollout_correction/logp_diff_max"]) < 1e-4  # before any update both are the base
    for row in rows[1:]:
        assert float(row["rollout_correction/logp_diff_mean"]) > 1e-3  # the trained policy has moved away
        assert float(row["rollout_correction/weight_mean"]) != pytest.approx(1.0, abs=1e-4)


def test_module_sampling_engine_reports_its_own_logps(tiny_policy_dir: str, tmp_path: Path) -> None:
    """HF generate samples from the trained module: old = current stays valid, and its own log-probs (returned on
    request) agree with the trainer's re-score."""
    args = small_args(tiny_policy_dir, tmp_path, "--model.init_args.rollout.init_args.return_old_logp", "true",
                      *CORRECTION, steps=2)
    cli = run_cli(args)
    for row in _rows(cli):
        assert float(row["rollout_correction/logp_diff_max"]) < 1e-4
        assert float(row["ratio/mean"]) == pytest.approx(1.0)


def test_one_step_round_uses_the_update_forward_as_old_logps(tiny_policy_dir: str, tmp_path: Path) -> None:
    """Issue 25 item 5: an engine with its own (synced) weights and a round of one optimizer step: the old
    log-probs are the update forward's detached values (no separate pass, ratio exactly 1), and the rollout
    correction's weights come from them too (no pass either); several optimizer steps per round (two mini-batches)
    re-score, with the correction or without."""
    engine = ["--model.init_args.rollout", "tests.helpers.engines.CopyEngine"]
    one_step = run_cli(small_args(tiny_policy_dir, tmp_path / "one", *engine, steps=2))
    for row in _rows(one_step):
        assert float(row["rescored_old_logp"]) == 0.0
        assert float(row["ratio/mean"]) == 1.0  # exp(logp - logp.detach()): exactly on-policy
    two_steps = run_cli(small_args(tiny_policy_dir, tmp_path / "two", *engine,
                                   "--model.init_args.mini_batch_size", "6", steps=2))
    for row in _rows(two_steps):
        assert float(row["rescored_old_logp"]) == 1.0
    corrected = run_cli(small_args(tiny_policy_dir, tmp_path / "corr", *_engine_args(stale=False), steps=1))
    [row] = _rows(corrected)
    assert float(row["rescored_old_logp"]) == 0.0
    assert float(row["ratio/mean"]) == 1.0
    assert float(row["rollout_correction/logp_diff_max"]) < 1e-4  # measured against the update's own forward
    corrected_two = run_cli(small_args(tiny_policy_dir, tmp_path / "corr2", *_engine_args(stale=False),
                                       "--model.init_args.mini_batch_size", "6", steps=1))
    [row] = _rows(corrected_two)
    assert float(row["rescored_old_logp"]) == 1.0
    assert float(row["rollout_correction/logp_diff_max"]) < 1e-4
