"""DAPO-style dynamic sampling through the real system: whole groups kept, batch size fixed, rollouts counted."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from diva_lightning.cli import run_cli
from diva_lightning.core.metrics import zero_std_fraction
from diva_lightning.data.batch import merge_families
from diva_lightning.rollout.base import Rollout
from diva_lightning.system.datamodule import DivaDataModule
from tests.test_module import REPO, _recorder, small_args

DAPO = ["--config", str(REPO / "experiments/grpo.yaml"), "--config", str(REPO / "experiments/dapo.yaml")]


def test_merge_families_keeps_whole_prompts_with_their_images() -> None:
    dm = DivaDataModule(questions_per_step=2, num_variants=1)
    dm.world.train_size = 16
    dm.setup("fit")
    a = dm.build_families(dm.question_batch(0), 1)  # 4 prompts: (q0, q0'), (q1, q1')
    b = dm.build_families(dm.question_batch(1), 1)
    merged = merge_families([(a, [2, 3]), (b, [0, 1])])
    assert merged.problems == [a.problems[2], a.problems[3], b.problems[0], b.problems[1]]
    assert merged.family_index.tolist() == [0, 0, 1, 1]
    assert merged.question_ids == [a.question_ids[2], a.question_ids[3], b.question_ids[0], b.question_ids[1]]
    assert merged.image_owner.tolist() == [0, 1, 2, 3]
    assert torch.equal(merged.images[1], a.images[3]) and torch.equal(merged.images[2], b.images[0])
    assert merged.difficulty.tolist() == [*a.difficulty[2:].tolist(), *b.difficulty[:2].tolist()]


def test_rollout_select_and_cat() -> None:
    r = Rollout(prompt_index=torch.tensor([0, 0, 1, 1]), completion_ids=torch.arange(8).view(4, 2),
                completion_mask=torch.ones(4, 2, dtype=torch.long), texts=list("abcd"),
                finished=torch.tensor([True, False, True, True]))
    s = Rollout(prompt_index=torch.tensor([0]), completion_ids=torch.tensor([[7, 8, 9]]),
                completion_mask=torch.tensor([[1, 1, 0]]), texts=["e"], finished=torch.tensor([False]))
    out = Rollout.cat([r.select([2, 3], torch.tensor([0, 0])), s.select([0], torch.tensor([1]))], pad_id=-1)
    assert out.prompt_index.tolist() == [0, 0, 1] and out.texts == ["c", "d", "e"]
    assert out.completion_ids.tolist() == [[4, 5, -1], [6, 7, -1], [7, 8, 9]]
    assert out.completion_mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0]]
    assert out.finished.tolist() == [True, True, False]


def _metrics(cli: object) -> list[dict[str, str]]:
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:  # type: ignore[attr-defined]
        return [r for r in csv.DictReader(f) if r.get("reward")]


def test_dapo_keeps_the_batch_size_and_counts_every_rollout(tiny_policy_dir: str, tmp_path: Path) -> None:
    """The untrained policy leaves many groups without spread: they are replaced by drawn ones, the batch keeps
    B prompts x G responses, and `rollouts/generated` counts the dropped draws too."""
    args = small_args(tiny_policy_dir, tmp_path, *DAPO, steps=3) + ["--data.init_args.questions_per_step", "4"]
    cli = run_cli(args)
    rows = _metrics(cli)
    outputs = _recorder(cli.trainer).outputs
    total = 0.0
    for row, out in zip(rows, outputs):
        draws, generated = float(row["dynamic_sampling/draws"]), float(row["dynamic_sampling/generated_rollouts"])
        kept, filled = float(row["dynamic_sampling/kept_rollouts"]), float(row["dynamic_sampling/filled_units"])
        assert out["rewards"].numel() == kept == 4 * 3  # B questions x G (3 in these small runs), whatever was drawn
        assert generated == draws * 12 and 1 <= draws <= 3
        # only filler groups (the budget ran out) may lack spread
        zero = zero_std_fraction(out["rewards"].double(), out["prompt_ids"])
        assert zero * 4 == pytest.approx(filled)
        total += generated
        assert float(row["rollouts/generated"]) == total
    assert any(float(r["dynamic_sampling/draws"]) > 1 for r in rows)  # it really drew more
    assert cli.datamodule.side_stream.position == sum(int(float(r["dynamic_sampling/draws"])) - 1 for r in rows)


def test_grpo_without_dynamic_sampling_counts_its_rollouts(tiny_policy_dir: str, tmp_path: Path) -> None:
    cli = run_cli(small_args(tiny_policy_dir, tmp_path, "--config", str(REPO / "experiments/grpo.yaml"), steps=2))
    assert [float(r["rollouts/generated"]) for r in _metrics(cli)] == [6.0, 12.0]  # 2 questions x G=3 per step
    assert cli.model.rollouts_generated == 12


def never_right(response: str, answer: str) -> float:
    return 0.0


def test_filter_metric_accuracy_drops_groups_whose_spread_is_format_only(tiny_policy_dir: str,
                                                                          tmp_path: Path) -> None:
    """MM-Eureka filters on accuracy: a group whose answers are all wrong but whose formats differ (shaped reward 0
    or 0.1) has no accuracy spread, so `metric: accuracy` drops it (`metric: reward`, DAPO's, keeps it: the test
    above)."""
    args = small_args(tiny_policy_dir, tmp_path, *DAPO, steps=1) + [
        "--data.init_args.questions_per_step", "4",
        "--model.init_args.reward.init_args.accuracy_fn", f"{__name__}.never_right",
        "--model.init_args.reward.init_args.format_fn", "tests.helpers.rewards.contains_digit",
        "--model.init_args.dynamic_sampling.metric", "accuracy"]
    cli = run_cli(args)
    (row,), (out,) = _metrics(cli), _recorder(cli.trainer).outputs
    assert out["rewards"].numel() == 4 * 3 and float(out["accuracy"].abs().sum()) == 0.0
    # no unit ever has accuracy spread: every draw is spent and all 4 kept groups are filler ...
    assert float(row["dynamic_sampling/draws"]) == 3 and float(row["dynamic_sampling/filled_units"]) == 4
    # ... although some of them have reward (format) spread, which `metric: reward` would have kept
    assert zero_std_fraction(out["rewards"].double(), out["prompt_ids"]) < 1.0


def test_filter_metric_is_checked() -> None:
    from diva_lightning.training.config import DynamicSamplingConfig

    assert DynamicSamplingConfig(metric="accuracy").check() == []
    assert "dynamic_sampling.metric" in DynamicSamplingConfig(metric="format").check()[0]
