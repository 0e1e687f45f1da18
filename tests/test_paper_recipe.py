"""The paper's recipes and the seed's baselines, resolved through the real CLI.

- The 7B scale recipe (`experiments/paper/diva_qwen2_5_vl_7b.yaml` on full.yaml + fsdp.yaml) holds each of the
  authors' values, wherever it gets them from (many come from full.yaml): a later change of a default cannot
  silently change the recipe. Its Trainer is built on this CPU machine by overriding only
  `--trainer.accelerator cpu`; the 8 "devices", the ModelParallelStrategy and bf16-mixed are constructed as
  configured (nothing is launched).
- The two algorithm recipes stacked under it, `released_code.yaml` (the authors' released code) and
  `paper_formulas.yaml` (the paper's text), hold every value their comments cite (file:line or paper part), and
  `grpo_released.yaml` holds the released GRPO script's batching (8x the rollouts of the other rows).
- Each baseline overlay changes exactly the components it names, at an equal rollout budget; every sweep row stacks
  under the recipe unchanged (the recipe sets no key a row sets).
"""

from __future__ import annotations

from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from diva_lightning.callbacks import DifficultyCallback, ValidateAfterTraining, ValidateBeforeTraining
from diva_lightning.cli import run_cli
from diva_lightning.core.difficulty import update_difficulty
from diva_lightning.models.prompt import R1_INSTRUCTION
from diva_lightning.rewards import CombinedReward
from diva_lightning.rewards.released import ReleasedReward
from diva_lightning.training.estimators import DivaAdvantage, GRPOAdvantage
from sweeps._common import ROWS
from tests.test_configs import _flat

REPO = Path(__file__).resolve().parents[1]
FULL, FSDP, GRPO = "experiments/full.yaml", "experiments/fsdp.yaml", "experiments/grpo.yaml"
RECIPE = "experiments/paper/diva_qwen2_5_vl_7b.yaml"
OFFICIAL = "experiments/paper/official_difficulty.yaml"
RELEASED = "experiments/paper/released_code.yaml"
PAPER = "experiments/paper/paper_formulas.yaml"
GRPO_RELEASED = "experiments/grpo_released.yaml"
SHARE, EUREKA = "experiments/share_grpo.yaml", "experiments/mm_eureka.yaml"
SCALE = (FSDP, RECIPE)  # stacked after a row's overlays, as `sweeps/ablate.py --config` does
BENCHMARKS = ("mathvista", "mathverse", "mathvision", "olympiadbench", "wemath", "mmk12")


def _args(*configs: str) -> list[str]:
    return [a for c in configs for a in ("--config", str(REPO / c))]


@lru_cache(maxsize=1)
def _parser() -> Any:
    return run_cli(_args(FULL) + ["--trainer.logger.init_args.save_dir", "/nonexistent"], run=False).parser


@cache
def _resolved(*configs: str) -> dict[str, Any]:
    """Leaf keys of the resolved config of a stack (parsed by the real CLI's parser, nothing instantiated)."""
    parser = _parser()
    return _flat(yaml.safe_load(parser.dump(parser.parse_args(_args(*configs)), format="yaml", skip_none=False)))


def _changed(a: dict[str, Any], b: dict[str, Any]) -> set[str]:
    return {k for k in set(a) | set(b) if a.get(k) != b.get(k) and ".logger." not in k}


def _covers(changed: set[str], components: set[str]) -> tuple[set[str], set[str]]:
    """(keys changed outside the components, components not changed)."""
    stray = {k for k in changed if not any(k == c or k.startswith(c + ".") for c in components)}
    missing = {c for c in components if not any(k == c or k.startswith(c + ".") for k in changed)}
    return stray, missing


def _budget(cfg: dict[str, Any], dp: int = 1) -> int:
    """Responses per optimizer step over all ranks: questions x (1 + V) x G."""
    return (cfg["data.init_args.questions_per_step"] * dp * (cfg["data.init_args.num_variants"] + 1)
            * cfg["model.init_args.num_generations"])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("paper")
    return run_cli(_args(FULL, *SCALE) + ["--trainer.accelerator", "cpu",
                                          "--trainer.logger.init_args.save_dir", str(root)], run=False)


def test_recipe_holds_the_authors_values(recipe: Any) -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    from diva_lightning.rollout.vllm import VLLMEngine

    trainer, model, data = recipe.trainer, recipe.model, recipe.datamodule
    # 8 GPUs, FSDP2 (ModelParallelStrategy, data parallel 8), bf16 compute with float32 master weights
    assert isinstance(trainer.strategy, ModelParallelStrategy) and trainer.num_devices == 8
    strategy = {k.rsplit(".", 1)[1]: v for k, v in _resolved(FULL, *SCALE).items()
                if k.startswith("trainer.strategy.init_args.")}  # what the strategy is built from
    assert (strategy["data_parallel_size"], strategy["tensor_parallel_size"]) == (8, 1)
    assert trainer.precision == "bf16-mixed" and model.policy_cfg.dtype == "float32"
    assert model.policy_cfg.gradient_checkpointing and not model.policy_cfg.freeze_vision_tower
    assert model.policy_cfg.lora is None and model.policy_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    # n = 5; 64 originals + 64 variants per step = 8 questions per GPU x 8 GPUs, V = 1; 640 responses
    assert model.num_generations == 5 and data.num_variants == 1 and data.plan_settings.plan == "tiers"
    assert data.questions_per_step * strategy["data_parallel_size"] == 64
    assert _budget(_resolved(FULL, *SCALE), dp=8) == 640
    # one update per step: one PPO epoch over one mini-batch (the round's responses)
    assert model.update.epochs == 1 and model.update.mini_batch_size is None
    # AdamW lr 1e-6 constant (no scheduler is returned), weight decay 1e-2; grad clip 1.0
    model.policy = torch.nn.Linear(2, 2)
    optimizer = model.configure_optimizers()
    assert type(optimizer) is torch.optim.AdamW and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-6, 1e-2, (0.9, 0.999))
    assert model.grad_clip == 1.0
    # clip 0.2 / 0.3, dual clip 3.0, token mean, token-level ratio, no KL (so no reference model), no entropy
    loss = model.loss_cfg
    assert (loss.clip_low, loss.clip_high, loss.dual_clip, loss.agg) == (0.2, 0.3, 3.0, "token_mean")
    assert (loss.kl_coef, loss.entropy_coef, loss.ratio_level) == (0.0, 0.0, "token")
    assert not loss.mask_truncated_completions and model.correction is None
    # prompt 2048 (too long: skipped and counted, as filter_overlong_prompts) / response 4096; pixels 512^2..1024^2
    cfg = model.policy_cfg
    assert (cfg.max_prompt_length, cfg.prompt_overflow) == (2048, "skip")
    assert (cfg.min_pixels, cfg.max_pixels) == (262_144, 1_048_576)
    train, val = model.train_sampling, model.val_sampling
    assert (train.temperature, train.top_p, train.max_new_tokens) == (1.0, 1.0, 4096)
    assert (val.temperature, val.top_p, val.max_new_tokens, val.num_samples) == (0.6, 0.95, 4096, 1)
    # the authors' prompt and reward, DIVA's estimator
    assert model.prompt.instruction == R1_INSTRUCTION and model.prompt.system is None
    assert isinstance(model.reward, CombinedReward)
    assert (model.reward.acc_weight, model.reward.format_weight) == (0.9, 0.1)
    adv = model.advantage
    assert isinstance(adv, DivaAdvantage) and (adv.k, adv.batch_norm, adv.difficulty_weighting) == (0.1, True, True)
    assert adv.rrb == "range" and adv.weight_terms == "global"
    # the paper's difficulty rule (linear, eta 4, on accuracy, D in [1, 9] from 5)
    (difficulty,) = [c for c in trainer.callbacks if isinstance(c, DifficultyCallback)]
    assert (difficulty.table.rule, difficulty.table.eta, difficulty.statistic) == ("linear", 4.0, "accuracy")
    assert (difficulty.table.d_min, difficulty.table.d_max, difficulty.table.initial) == (1.0, 9.0, 5.0)
    # validation on MMK12 test every 10 steps and before training; 5 epochs
    assert trainer.val_check_interval == 10 and trainer.check_val_every_n_epoch is None
    assert sum(isinstance(c, ValidateBeforeTraining) and c.enabled for c in trainer.callbacks) == 1
    # ... and once more after the last step unless it just validated (ray_trainer.py:1027-1035)
    assert sum(isinstance(c, ValidateAfterTraining) and c.enabled for c in trainer.callbacks) == 1
    assert trainer.num_sanity_val_steps == 0 and trainer.max_epochs == 5 and trainer.max_steps == -1
    assert {n: (s.path, s.benchmark) for n, s in data.val_sources.items()} == {
        "mmk12": ("data/benchmarks/MMK12/test.parquet", "mmk12")}
    # Table 1: the six benchmarks as named test sources, each read by its own reader
    assert {n: s.benchmark for n, s in data.test_sources.items()} == {b: b for b in BENCHMARKS}
    assert data.train_source == "data/diva/train.parquet"
    # rollouts on vLLM at the authors' memory share, prompt + response fits its context
    assert isinstance(model.engine, VLLMEngine) and model.engine.gpu_memory_utilization == 0.6
    assert model.engine.max_model_len == 2048 + 4096


@pytest.mark.parametrize("path", [RECIPE, OFFICIAL, SHARE, EUREKA, RELEASED, PAPER, GRPO_RELEASED])
def test_every_key_is_commented(path: str) -> None:
    for number, line in enumerate((REPO / path).read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- class_path"):
            continue
        key, _, value = stripped.partition(":")
        if value.strip() and not value.strip().startswith("#") and not value.strip().startswith("{"):
            assert "#" in value, f"{path}:{number}: key {key!r} has no comment"


# What each overlay may change relative to its base (besides the run name), and its base.
BASELINES = {
    SHARE: ((FULL,), {"data.init_args.plan", "trainer.callbacks",
                      "model.init_args.advantage.init_args.batch_norm",
                      "model.init_args.advantage.init_args.difficulty_weighting",
                      "model.init_args.advantage.init_args.rrb"}),
    EUREKA: ((FULL, GRPO), {"model.init_args.policy_config.freeze_vision_tower", "model.init_args.loss.clip_high",
                            "model.init_args.loss.agg", "model.init_args.dynamic_sampling"}),
    OFFICIAL: ((FULL,), {"data.init_args.plan", "trainer.callbacks"}),
    RELEASED: ((FULL,), {"data.init_args.plan", "trainer.callbacks", "model.init_args.advantage.init_args.rrb",
                         "model.init_args.reward"}),
}


@pytest.mark.parametrize("overlay", sorted(BASELINES))
def test_overlay_changes_exactly_its_components(overlay: str) -> None:
    base_configs, components = BASELINES[overlay]
    base, over = _resolved(*base_configs), _resolved(*base_configs, overlay)
    stray, missing = _covers(_changed(base, over), components)
    assert not stray, f"{overlay} changes keys it should not: {sorted(stray)}"
    assert not missing, f"{overlay} does not change: {sorted(missing)}"
    assert _budget(over) == _budget(_resolved(FULL)) == 80  # 8 questions x 10 responses per question
    assert over["model.init_args.loss.kl_coef"] == 0.0


def test_share_grpo_is_local_plus_global_on_paraphrases() -> None:
    cfg = _resolved(FULL, SHARE)
    assert cfg["data.init_args.plan"] == "paraphrase" and cfg["data.init_args.num_variants"] == 1
    assert cfg["model.init_args.advantage.class_path"].endswith("DivaAdvantage")
    assert (cfg["model.init_args.advantage.init_args.local_weight"],
            cfg["model.init_args.advantage.init_args.global_weight"]) == (1.0, 1.0)
    assert not any("DifficultyCallback" in c["class_path"] for c in cfg["trainer.callbacks"])


def test_mm_eureka_is_grpo_with_accuracy_filtering() -> None:
    cfg = _resolved(FULL, GRPO, EUREKA)
    assert cfg["model.init_args.advantage.class_path"].endswith("GRPOAdvantage")
    assert cfg["model.init_args.advantage.init_args.scale"] == "group"
    assert (cfg["model.init_args.dynamic_sampling.metric"], cfg["model.init_args.dynamic_sampling.unit"]) == (
        "accuracy", "prompt")
    assert (cfg["model.init_args.loss.clip_low"], cfg["model.init_args.loss.clip_high"],
            cfg["model.init_args.loss.dual_clip"]) == (0.2, 0.2, 3.0)


def test_official_difficulty_changes_only_the_rule_and_statistic_of_the_difficulty_callback() -> None:
    full, official = _resolved(FULL)["trainer.callbacks"], _resolved(FULL, OFFICIAL)["trainer.callbacks"]
    assert [c["class_path"] for c in full] == [c["class_path"] for c in official]
    for a, b in zip(full, official, strict=True):
        changed = {k for k in a["init_args"] if a["init_args"][k] != b["init_args"][k]}
        assert changed == ({"rule", "statistic"} if a["class_path"].endswith("DifficultyCallback") else set())
    (difficulty,) = [c["init_args"] for c in official if c["class_path"].endswith("DifficultyCallback")]
    assert (difficulty["rule"], difficulty["statistic"], difficulty["update"]) == ("binned", "reward", "step")


@pytest.mark.slow
@pytest.mark.parametrize("row", [*sorted(ROWS), "official_difficulty", "released_code", "paper_formulas"])
def test_every_row_stacks_under_the_recipe_unchanged(row: str) -> None:
    """A row changes the same keys under the 7B recipe as on the embedded default (the recipe undoes none of
    them), at the recipe's 640 responses per step (dynamic sampling rows keep 640; they generate more), except the
    released GRPO baseline's 5,120."""
    named = {"official_difficulty": (OFFICIAL,), "released_code": (RELEASED,), "paper_formulas": (PAPER,)}
    overlays = named[row] if row in named else ROWS[row]
    embedded = _changed(_resolved(FULL), _resolved(FULL, *overlays))
    paper = _changed(_resolved(FULL, *SCALE), _resolved(FULL, *overlays, *SCALE))
    assert paper == embedded
    assert _budget(_resolved(FULL, *overlays, *SCALE), dp=8) == (5120 if row == "grpo_released" else 640)


def _built(*configs: str, root: Path) -> Any:
    return run_cli(_args(*configs) + ["--trainer.accelerator", "cpu", "--trainer.logger.init_args.save_dir",
                                      str(root)], run=False)


def _difficulty(trainer: Any) -> DifficultyCallback:
    (callback,) = [c for c in trainer.callbacks if isinstance(c, DifficultyCallback)]
    return callback


def test_released_code_recipe_holds_the_released_values(tmp_path: Path) -> None:
    cli = _built(FULL, RELEASED, *SCALE, root=tmp_path)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    adv = model.advantage
    # weight_mode ZSCORENORM_WAN_RRBLOCAL_RRBGLOBAL (script:59), k 0.1 (script:62), A = local + global (ray_trainer:845)
    assert isinstance(adv, DivaAdvantage) and (adv.k, adv.batch_norm, adv.difficulty_weighting) == (0.1, True, True)
    assert adv.weight_terms == "global" and (adv.local_weight, adv.global_weight) == (1.0, 1.0)
    # RRB: groups whose rewards are all below 0.15 are scaled by 0.1 (diva_utils.py:145-146, ray_trainer.py:829-843)
    assert (adv.rrb, adv.rrb_threshold, adv.rrb_factor) == ("threshold", 0.15, 0.1)
    # binned difficulty on the family's mean combined reward, clipped to [1, 9], every step, from 5
    difficulty = _difficulty(trainer)
    assert (difficulty.table.rule, difficulty.statistic) == ("binned", "reward")
    assert (difficulty.table.d_min, difficulty.table.d_max, difficulty.table.initial) == (1.0, 9.0, 5.0)
    # the script's bins [0,.05] [.05,.3] [.3,.5] [.5,.7] [.7,1] -> +2 +1 0 -1 -2, first match (script:60-61)
    scores = torch.tensor([0.0, 0.05, 0.1, 0.3, 0.31, 0.5, 0.7, 0.71, 1.0], dtype=torch.float64)
    moved = update_difficulty(torch.full_like(scores, 5.0), scores, rule="binned") - 5.0
    assert moved.tolist() == [2.0, 2.0, 1.0, 1.0, 0.0, 0.0, -1.0, -2.0, -2.0]
    # the released variant plan (gen_new_item.py:378-414) and reward (math.py:21-49), V = 1, n = 5
    assert data.plan_settings.plan == "released" and data.num_variants == 1 and model.num_generations == 5
    assert type(model.reward) is ReleasedReward
    assert (model.reward.acc_weight, model.reward.format_weight) == (0.9, 0.1)
    # the scale recipe is unchanged by it: 640 responses per step, one update
    assert _budget(_resolved(FULL, RELEASED, *SCALE), dp=8) == 640 and model.update.mini_batch_size is None


def test_paper_formulas_recipe_holds_the_papers_values_and_pins_full_yaml(tmp_path: Path) -> None:
    cli = _built(FULL, PAPER, *SCALE, root=tmp_path)
    model, data, trainer = cli.model, cli.datamodule, cli.trainer
    adv = model.advantage
    # RRB range (max - min) / R_max with R_max 1; local + global, batch z-score, difficulty weighting k 0.1
    assert isinstance(adv, DivaAdvantage) and (adv.rrb, adv.r_max) == ("range", 1.0)
    assert (adv.k, adv.batch_norm, adv.difficulty_weighting, adv.weight_terms) == (0.1, True, True, "global")
    # D_new = clip(D + 4 (0.5 - accuracy)) in [1, 9] from 5
    difficulty = _difficulty(trainer)
    assert (difficulty.table.rule, difficulty.table.eta, difficulty.statistic) == ("linear", 4.0, "accuracy")
    assert (difficulty.table.d_min, difficulty.table.d_max, difficulty.table.initial) == (1.0, 9.0, 5.0)
    # three tiers around D_mid 5, one variant, n = 5; math-verify reward 0.9 / 0.1
    plan = data.plan_settings
    assert (plan.plan, plan.d_mid, plan.band, plan.num_variants) == ("tiers", 5.0, 0.5, 1)
    assert model.num_generations == 5
    assert type(model.reward) is CombinedReward and (model.reward.acc_weight, model.reward.format_weight) == (0.9, 0.1)
    # every value equals full.yaml's: the overlay changes nothing but the run name
    assert _changed(_resolved(FULL), _resolved(FULL, PAPER)) == set()


def test_grpo_released_is_the_released_scripts_batching() -> None:
    # 584a379 GRPO_n=10.sh: n 10 (:88), 512 prompts (:86), 128 prompts per update (:87), shuffled (:92)
    embedded, paper = _resolved(FULL, GRPO_RELEASED), _resolved(FULL, GRPO_RELEASED, *SCALE)
    for cfg in (embedded, paper):
        assert cfg["model.init_args.num_generations"] == 10 and cfg["data.init_args.num_variants"] == 0
        assert cfg["data.init_args.questions_per_step"] == 64  # per process: 512 prompts over the recipe's 8
        per_process = _budget(cfg)
        assert per_process // cfg["model.init_args.mini_batch_size"] == 4 and cfg["model.init_args.ppo_epochs"] == 1
        assert cfg["model.init_args.advantage.class_path"] == f"{GRPOAdvantage.__module__}.GRPOAdvantage"
        assert not any("DifficultyCallback" in c["class_path"] for c in cfg["trainer.callbacks"])
    assert _budget(paper, dp=8) == 5120 == 8 * _budget(_resolved(FULL, *SCALE), dp=8)
    # the equal-budget baseline stays grpo.yaml: 80 responses per step like full.yaml
    assert _budget(_resolved(FULL, GRPO)) == _budget(_resolved(FULL)) == 80


def test_released_code_trains_on_the_embedded_default(tiny_policy_dir: str, tmp_path: Path) -> None:
    """Two real steps of full.yaml + released_code.yaml: the released plan is realised (D = 5: an extra copy, a
    paraphrase, noise or rotation), graded by the released reward, and the binned rule moves D by the family's
    mean reward."""
    from tests.test_module import _recorder

    args = ["fit", *_args(FULL, RELEASED), "--model.init_args.policy", tiny_policy_dir, "--build_base_policy", "false",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.callbacks+=tests.helpers.recorder.Recorder", "--data.init_args.questions_per_step", "4",
            "--data.init_args.world.train_size", "24", "--data.init_args.world.val_size", "8",
            "--data.init_args.world.test_size", "8", "--model.init_args.num_generations", "2",
            "--model.init_args.train_sampling.max_new_tokens", "10"]
    cli = run_cli(args)
    rec = _recorder(cli.trainer)
    first = rec.outputs[0]
    # 4 families of an original and one variant; step +1 at D = 5 gives kinds original (0: the two copy entries and
    # a paraphrase entry that kept the text, counted as originals), paraphrase (1) and image (2, noise or rotation)
    assert len(first["prompt_ids"].unique()) == 8 and set(first["kind"].tolist()) <= {0, 1, 2}
    assert 2 in first["kind"].tolist()
    # the binned rule on the family's mean combined reward (0.9 accuracy + 0.1 format), from D = 5
    seen: dict[str, float] = {}
    for out in rec.outputs:
        for fam in out["family_ids"].unique().tolist():
            sel = out["family_ids"] == fam
            qid = out["question_ids"][int(sel.nonzero()[0])]
            mean = out["rewards"][sel].to(torch.float64).mean().reshape(1)
            old = torch.tensor([seen.get(qid, 5.0)], dtype=torch.float64)
            seen[qid] = float(update_difficulty(old, mean, rule="binned")[0])
    assert rec.tables[-1] == pytest.approx(seen)
