"""DivaGRPOModule through the real CLI and Trainer, on the real tiny model and world."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from diva_lightning.cli import run_cli

REPO = Path(__file__).resolve().parents[1]


def small_args(policy: str, root: Path, *extra: str, steps: int = 2) -> list[str]:
    return [
        "fit", "--config", str(REPO / "experiments/full.yaml"), *extra,
        "--model.init_args.policy", policy,
        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "1000",
        "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.callbacks+=tests.helpers.recorder.Recorder",
        "--data.init_args.questions_per_step", "2", "--data.init_args.world.train_size", "24",
        "--data.init_args.world.val_size", "8", "--data.init_args.world.test_size", "8",
        "--model.init_args.num_generations", "3", "--model.init_args.train_sampling.max_new_tokens", "10",
        "--model.init_args.reward.init_args.accuracy_fn", "tests.helpers.rewards.contains_digit",
        "--model.init_args.lr", "1e-2", "--build_base_policy", "false",
    ]


def _recorder(trainer: pl.Trainer) -> Any:
    return next(c for c in trainer.callbacks if type(c).__name__ == "Recorder")


def test_step_feeds_difficulty_and_monitor(tiny_policy_dir: str, tmp_path: Path) -> None:
    cli = run_cli(small_args(tiny_policy_dir, tmp_path, steps=2))
    rec = _recorder(cli.trainer)
    assert len(rec.outputs) == 2
    for out in rec.outputs:
        # B=2 questions x (original + V=1 variant) x G=3 responses
        assert out["rewards"].shape == (12,)
        assert out["prompt_ids"].tolist() == [p for p in range(4) for _ in range(3)]
        assert out["family_ids"].tolist() == [0] * 6 + [1] * 6
        # reward = 0.9 * accuracy + 0.1 * format; the untrained policy never has the format
        assert torch.allclose(out["rewards"], 0.9 * out["accuracy"])
    # the difficulty update by hand: D = clip(D_old + 4 * (0.5 - family accuracy)) over all 6 responses
    expected: dict[str, float] = {}
    for out in rec.outputs:
        for fam in (0, 1):
            sel = out["family_ids"] == fam
            qid = out["question_ids"][int(sel.nonzero()[0])]
            acc = float(out["accuracy"][sel].mean())
            old = expected.get(qid, 5.0)
            expected[qid] = min(9.0, max(1.0, old + 4.0 * (0.5 - acc)))
    assert rec.tables[-1] == pytest.approx(expected)
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward")]
    first = rec.outputs[0]
    groups = [first["rewards"][i : i + 3] for i in range(0, 12, 3)]
    zero = sum(float(g.max() - g.min()) == 0 for g in groups) / 4
    assert float(rows[0]["frac_reward_zero_std"]) == pytest.approx(zero)
    assert float(rows[0]["reward"]) == pytest.approx(float(first["rewards"].mean()), abs=1e-6)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tiny_policy_dir: str, tmp_path: Path) -> None:
    """A run stopped at step 2 and resumed to step 4 ends with the same table, metrics and weights."""
    extra = ["--trainer.deterministic", "true",
             "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
             "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
             "--trainer.callbacks.every_n_train_steps", "1", "--trainer.callbacks.save_top_k", "-1"]
    full = run_cli(small_args(tiny_policy_dir, tmp_path / "full", *extra, steps=4))
    ckpt = next((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    resumed = run_cli(small_args(tiny_policy_dir, tmp_path / "resumed", steps=4) + ["--ckpt_path", str(ckpt)])
    a, b = _recorder(full.trainer), _recorder(resumed.trainer)
    assert len(b.outputs) == 2  # steps 3 and 4 only
    assert a.tables[-1] == b.tables[-1]
    for key in ("rewards", "advantages", "completion_lengths"):
        assert torch.equal(a.outputs[-1][key], b.outputs[-1][key]), key
    assert a.outputs[-1]["question_ids"] == b.outputs[-1]["question_ids"]
    for (name, p), q in zip(full.model.policy.named_parameters(), resumed.model.policy.parameters()):
        assert torch.equal(p, q), name
    # the updates were real: the weights moved away from the base policy
    base = run_cli(small_args(tiny_policy_dir, tmp_path / "base", steps=0))
    pairs = zip(full.model.policy.parameters(), base.model.policy.parameters())
    moved = [not torch.equal(p, q) for p, q in pairs]
    assert any(moved)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_stats_combine_to_the_full_batch_stats(agg: str) -> None:
    """Two micro-batches of 3 with mini-batch-wide denominators log what one batch of 6 would."""
    from diva_lightning.core.loss import policy_loss
    from diva_lightning.training.ppo import combine_micro_stats
    from diva_lightning.training.ppo import stats_dict as _stats_dict

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(6, 5, generator=g)
    old = logp + 0.3 * torch.randn(6, 5, generator=g)
    adv = torch.randn(6, generator=g)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = mask[4, 1:] = False
    ref = logp - 0.1
    kw = {"agg": agg, "num_tokens": float(mask.sum()), "num_seqs": 6}
    full = _stats_dict(policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)[1])  # type: ignore[arg-type]
    parts = [(_stats_dict(policy_loss(logp[s], old[s], adv[s], mask[s], ref_logp=ref[s], **kw)[1]), 0.5)  # type: ignore[arg-type]
             for s in (slice(0, 3), slice(3, 6))]
    combined = combine_micro_stats(parts)
    for key in ("loss/policy", "kl", "ratio/max"):
        assert combined[key] == pytest.approx(full[key], rel=1e-5), key


def test_validation_mean_at_k_grades_k_samples_per_question(tiny_policy_dir: str, tmp_path: Path) -> None:
    from tests.helpers import rewards

    rewards.GRADED.clear()
    args = small_args(tiny_policy_dir, tmp_path, "--model.init_args.val_sampling.temperature", "0.7",
                      "--model.init_args.val_sampling.max_new_tokens", "6",
                      "--model.init_args.val_sampling.num_samples", "3", steps=0)
    args = ["validate"] + args[1:]
    args[args.index("tests.helpers.rewards.contains_digit")] = "tests.helpers.rewards.counting_contains_digit"
    i = args.index("--trainer.limit_val_batches")
    del args[i:i + 2]
    cli = run_cli(args)
    # 8 validation questions x 3 samples, and val/accuracy is the mean over all 24 graded responses
    assert len(rewards.GRADED) == 24
    expected = sum(rewards.contains_digit(r, "") for r in rewards.GRADED) / 24
    assert float(cli.trainer.callback_metrics["val/accuracy"]) == pytest.approx(expected)


def test_sampling_config_errors_name_the_field() -> None:
    from diva_lightning.system.module import DivaGRPOModule, SamplingConfig

    with pytest.raises(ValueError, match=r"val_sampling.num_samples > 1 needs temperature > 0"):
        DivaGRPOModule(val_sampling=SamplingConfig(temperature=0.0, num_samples=2))
    with pytest.raises(ValueError, match=r"val_sampling.num_samples must be >= 1, got 0"):
        DivaGRPOModule(val_sampling=SamplingConfig(temperature=0.6, num_samples=0))
    with pytest.raises(ValueError, match=r"train_sampling.num_samples must stay 1"):
        DivaGRPOModule(train_sampling=SamplingConfig(num_samples=4))


def test_every_setting_is_checked_when_the_system_is_built() -> None:
    """Issue 11: loss settings used to be validated only after the first rollout. Now all problems, one message."""
    from diva_lightning.models.prompt import PromptConfig
    from diva_lightning.system.module import CorrectionConfig, DivaGRPOModule, LossConfig, PolicyConfig

    with pytest.raises(ValueError) as err:
        DivaGRPOModule(
            loss=LossConfig(agg="mean", kl_type="k9", ratio_level="word"),
            rollout_correction=CorrectionConfig(mode="drop", cap=0.5),
            policy_config=PolicyConfig(dtype="float16", prompt_overflow="truncate"),
            prompt=PromptConfig(instruction="  "), ppo_epochs=0, micro_batch_size=0,
        )
    for part in ("loss.agg", "loss.kl_type", "loss.ratio_level", "rollout_correction.mode", "rollout_correction.cap",
                 "policy_config.dtype", "policy_config.prompt_overflow", "prompt.instruction", "ppo_epochs",
                 "micro_batch_size"):
        assert part in str(err.value), part


def test_fallbacks_are_logged_per_kind(tiny_policy_dir: str, tmp_path: Path) -> None:
    """Records without variants or think steps: every planned variant is a counted, logged fallback."""
    from diva_lightning.data.schema import QuestionRecord, write_records

    data = write_records([QuestionRecord(id=f"q{i}", problem=f"What is {i} + 1?", answer=str(i + 1))
                          for i in range(8)], tmp_path / "bare.jsonl")
    args = small_args(tiny_policy_dir, tmp_path, "--data.init_args.train_source", str(data),
                      "--data.init_args.val_source", str(data), "--data.init_args.test_source", "null", steps=2)
    cli = run_cli(args)
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward")]
    # every question starts at D = 5 (medium): its variant is a paraphrase, which these records cannot provide
    assert [float(r["data/variant_fallbacks/paraphrase"]) for r in rows] == [2.0, 2.0]
    out = _recorder(cli.trainer).outputs[0]
    assert out["kind"].tolist() == [0] * 12  # all prompts are originals, labelled as such
