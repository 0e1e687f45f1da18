"""FSDP2 with text-only and image questions on different ranks: no collective may diverge (issue 25 item 1).

Rank 0 holds only image questions and rank 1 only text-only ones, in every training step, every validation batch
and every test batch, and the micro-batches are single responses: before the fix the vision tower (a sharded unit
of its own) ran on rank 0 only, and gloo aborted at the first scoring or generation forward ("Received data size
doesn't match expected size"); on NCCL that is a hang. Each run is a real `python -m diva_lightning` subprocess
(Lightning's ModelParallelStrategy re-launches the script), two CPU processes under gloo.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from diva_lightning.core.seeding import stable_seed
from diva_lightning.data.schema import IMAGE_TAG, QuestionRecord, write_records
from diva_lightning.data.world import generate_world
from tests.training.test_fsdp import _LAUNCH_VARS, _free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
SEED = 0


def _text_only(record: QuestionRecord) -> QuestionRecord:
    return replace(record, problem=record.problem.replace(IMAGE_TAG, "").strip(), images=[],
                   variants=[v.replace(IMAGE_TAG, "").strip() for v in record.variants], meta={})


def _split_by_rank(records: list[QuestionRecord], image_owner: list[bool]) -> list[QuestionRecord]:
    return [r if keep else _text_only(r) for r, keep in zip(records, image_owner)]


def _data(tmp: Path) -> dict[str, Path]:
    """Train: global batch k of 2 questions is order[2k] (rank 0) and order[2k + 1] (rank 1), order being the
    datamodule's first-epoch permutation (``DivaDataModule.question_batch``); rank 0's gets the image. Evaluation:
    record i is rank i % 2's (``eval_shard``)."""
    train = generate_world(8, seed=1, split="train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(stable_seed("order", SEED, 0)))
    rank_of = {int(r): k % 2 for k, r in enumerate(order)}
    out = {"train": write_records(_split_by_rank(train, [rank_of[i] == 0 for i in range(len(train))]),
                                  tmp / "train.jsonl")}
    for split in ("val", "test"):
        recs = generate_world(4, seed=1, split=split)
        out[split] = write_records(_split_by_rank(recs, [i % 2 == 0 for i in range(len(recs))]), tmp / f"{split}.jsonl")
    return out


def _run(sub: str, policy: str, tmp: Path, data: dict[str, Path], extra: tuple[str, ...] = ()) -> Path:
    args = [
        sys.executable, "-m", "diva_lightning", sub, "--config", "experiments/full.yaml",
        "--config", "experiments/fsdp.yaml", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy.init_args.data_parallel_size", "2", "--seed_everything", str(SEED),
        "--model.init_args.policy", policy, "--build_base_policy", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp),
        "--trainer.logger.init_args.version", sub,
        "--data.init_args.train_source", str(data["train"]), "--data.init_args.val_source", str(data["val"]),
        "--data.init_args.test_source", str(data["test"]), "--data.init_args.questions_per_step", "1",
        "--model.init_args.num_generations", "2", "--model.init_args.micro_batch_size", "1",
        "--model.init_args.train_sampling.max_new_tokens", "6", "--model.init_args.val_sampling.max_new_tokens", "6",
        "--model.init_args.reward.init_args.accuracy_fn", "tests.helpers.rewards.contains_digit",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS and not k.startswith("TORCHELASTIC")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_PORT=str(_free_port()))
    done = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return next(tmp.glob(f"*/{sub}"))


def test_ranks_with_and_without_images_stay_in_step(tiny_policy_dir: str, tmp_path: Path) -> None:
    data = _data(tmp_path)
    fit = _run("fit", tiny_policy_dir, tmp_path, data,
               ("--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "2"))
    with open(fit / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len([r for r in rows if r.get("reward")]) == 2  # both training steps ran
    assert len([r for r in rows if r.get("val/accuracy")]) == 2  # and both validations
    test = _run("test", tiny_policy_dir, tmp_path, data)
    assert (test / "test").is_dir()
