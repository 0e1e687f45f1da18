"""`DivaGRPOModule`: the training system (rollout -> rewards -> advantages -> clipped policy update).

The policy, the rollout engine, the reward and the advantage estimator are injected components; this class only
orchestrates them. The math lives in `diva_lightning.core`, the update loop in `diva_lightning.training.ppo`.

One `training_step` is one DIVA round (design.md section 2):
1. encode the batch's prompts (original + variants; images already perturbed on the device),
2. sample G responses per prompt (`rollout`),
3. grade them (`reward`: shaped reward and its accuracy/format parts),
4. advantages from the estimator (DIVA: local + global, batch z-score, difficulty weight, RRB),
5. the PPO update (`training.ppo.PPOUpdate`): epochs over mini-batches, one optimizer step each, after which
   the rollout engine is told (weight sync),
6. return per-response outputs; `DifficultyCallback` and `AdvantageMonitor` consume them.

Validation, test and predict sample with `val_sampling` and grade each source by its own rule
(`diva_lightning.evaluation.run`: a benchmark's scorer, or the reward); test and predict results are kept in
`test_results` / `predict_results` for the CLI to write.

Staying on-policy (issue 11): old log-probs equal the current ones only when the engine samples from the trained
module itself and the round is a single optimizer step; otherwise the trainer re-scores them before the first
update. When the engine returns its own sampling log-probs, `rollout_correction` weighs each token by the
trainer/engine ratio (truncated or masked importance sampling) and logs the mismatch under `rollout_correction/`.

Sharding (issue 10): under Lightning's `ModelParallelStrategy` (`experiments/fsdp.yaml`), `configure_model` shards
the policy with FSDP2 (`training.sharding`); checkpoints are distributed; `export_policy` gathers the full weights
on every rank and rank 0 writes a `save_pretrained` folder.

Deviation from the official code, on purpose: the rollout of step s is sampled under an RNG seeded by
(seed, s, rank) inside `torch.random.fork_rng`, so a resumed run samples exactly what an uninterrupted run would.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from transformers import AutoConfig
from typing_extensions import override

from diva_lightning.core.correction import importance_weights
from diva_lightning.core.filtering import select_units, spread_filter
from diva_lightning.core.loss import truncation_mask
from diva_lightning.core.seeding import stable_seed
from diva_lightning.data.batch import FamilyBatch, merge_families
from diva_lightning.evaluation.run import EvalRun, SourceResult, log_values, sources_of
from diva_lightning.models.embedded import EMBEDDED
from diva_lightning.models.logprobs import (
    StepImages,
    completion_logprobs,
    packed_logprobs,
    sequence_lengths,
    step_images,
)
from diva_lightning.models.lora import apply_lora, is_lora, lora_scale, merge_lora_state_dict
from diva_lightning.models.policy import (
    PolicyBundle,
    load_policy,
    load_tokenizer_and_processor,
    resolve_policy_source,
)
from diva_lightning.models.prompt import PromptConfig
from diva_lightning.models.vision import VisionSpec
from diva_lightning.rewards import CombinedReward, Reward, RewardBreakdown
from diva_lightning.rollout.base import Rollout, RolloutEngine
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.system.checkpointing import RUN_SETTINGS_KEY, check_resume_settings
from diva_lightning.training import sharding
from diva_lightning.training.config import (
    CorrectionConfig,
    DynamicSamplingConfig,
    LossConfig,
    PolicyConfig,
    SamplingConfig,
)
from diva_lightning.training.estimators import AdvantageEstimator, DivaAdvantage
from diva_lightning.training.ppo import PPOUpdate, UpdateBatch
from diva_lightning.training.precision import MasterWeightAdamW, check_precision, needs_master_weights
from diva_lightning.training.prompt_budget import PromptMeasure, longest_prompt, prompt_limit

log = logging.getLogger(__name__)

# The authors' image budget (official-diva.md): a stock Qwen2.5-VL processor would allow 12.8 MP per image.
AUTHORS_PIXELS = (262_144, 1_048_576)
# config values naming the embedded base policy: the shipped build, or a local rebuild (built when missing)
EMBEDDED_POLICIES = (EMBEDDED, "artifacts/base_policy")

__all__ = ["CorrectionConfig", "DivaGRPOModule", "DynamicSamplingConfig", "LossConfig", "PolicyConfig",
           "SamplingConfig"]


class DivaGRPOModule(pl.LightningModule):
    """GRPO-family RL for vision-language policies, with DIVA as the default estimator.

    Args:
        policy: a local checkpoint directory (the embedded policy or e.g. a Qwen2.5-VL-7B copy) or a hub id.
        prompt: the format instruction appended to every problem and variant, and the system turn.
        policy_config: weights dtype, attention, gradient checkpointing, frozen vision tower, LoRA, pixel budget,
            prompt-length policy (the real-model scale knobs).
        advantage: the estimator component (`DivaAdvantage` or `GRPOAdvantage`, by class_path).
        reward: the reward component (shaped reward with accuracy and format parts).
        rollout: the generation engine (`HFGenerateEngine`, or `VLLMEngine` on a CUDA machine).
        num_generations: G, responses per prompt.
        train_sampling: rollout decoding (paper: temperature 1.0).
        val_sampling: evaluation decoding (paper: temperature 0.6, top_p 0.95; 0 = greedy).
        loss: clipping, aggregation, ratio level (GSPO), truncation masking, KL and entropy settings.
        rollout_correction: importance-sampling correction of engine/trainer mismatch (needs an engine that
            returns its sampling log-probs); null turns it off.
        dynamic_sampling: DAPO-style: drop zero-spread groups, draw more questions until the batch is full
            (rollouts are counted as generated: `rollouts/generated`); null turns it off.
        ppo_epochs: passes over each round's responses.
        mini_batch_size: responses per optimizer step (None: all responses of the round, one step per epoch).
        micro_batch_size: responses per forward/backward (memory knob; None: the whole mini-batch).
        lr / weight_decay / betas: AdamW (paper: lr 1e-6, constant schedule).
        grad_clip: max gradient norm (paper: 1.0; 0 disables); correct on sharded parameters.
        seed: seeds the per-step rollout RNG (linked from `seed_everything`).
    """

    def __init__(
        self,
        policy: str = EMBEDDED,
        prompt: PromptConfig | None = None,
        policy_config: PolicyConfig | None = None,
        advantage: AdvantageEstimator | None = None,
        reward: Reward | None = None,
        rollout: RolloutEngine | None = None,
        num_generations: int = 5,
        train_sampling: SamplingConfig | None = None,
        val_sampling: SamplingConfig | None = None,
        loss: LossConfig | None = None,
        rollout_correction: CorrectionConfig | None = None,
        dynamic_sampling: DynamicSamplingConfig | None = None,
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.policy_path = policy
        self.prompt = prompt or PromptConfig()
        self.policy_cfg = policy_config or PolicyConfig()
        self.train_sampling = train_sampling or SamplingConfig()
        self.val_sampling = val_sampling or SamplingConfig(temperature=0.0, top_p=1.0)
        self.loss_cfg = loss or LossConfig()
        self.correction = rollout_correction
        self.dynamic_sampling = dynamic_sampling
        problems = self.prompt.check() + self.policy_cfg.check() + self.loss_cfg.check()
        problems += self.train_sampling.check("train_sampling") + self.val_sampling.check("val_sampling")
        if self.correction is not None:
            problems += self.correction.check()
        if self.dynamic_sampling is not None:
            problems += self.dynamic_sampling.check()
        if num_generations < 1:
            problems.append(f"num_generations must be >= 1, got {num_generations}")
        if self.train_sampling.num_samples != 1:
            problems.append("train_sampling.num_samples must stay 1 (rollouts draw num_generations per prompt)")
        if self.train_sampling.temperature <= 0:
            problems.append("train_sampling.temperature must be > 0: rollouts sample")
        if lr <= 0 or grad_clip < 0:
            problems.append(f"lr must be > 0 and grad_clip >= 0, got {lr}, {grad_clip}")
        try:
            self.update = PPOUpdate(self.loss_cfg, epochs=ppo_epochs, mini_batch_size=mini_batch_size,
                                    micro_batch_size=micro_batch_size, max_len=self.train_sampling.max_new_tokens,
                                    max_tokens_per_micro_batch=self.policy_cfg.max_tokens_per_micro_batch)
        except ValueError as err:
            problems.extend(p for p in str(err).split("; ") if p not in problems)
        if problems:
            raise ValueError("DivaGRPOModule: " + "; ".join(problems))
        self.automatic_optimization = False
        self.advantage = advantage if advantage is not None else DivaAdvantage()
        self.reward = reward if reward is not None else CombinedReward()
        self.engine: RolloutEngine = rollout if rollout is not None else HFGenerateEngine()
        self.num_generations = num_generations
        self.lr, self.weight_decay, self.betas, self.grad_clip = lr, weight_decay, tuple(betas), grad_clip
        self.seed = seed
        self.bundle: PolicyBundle | None = None
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.difficulty_table: Any = None  # attached by DifficultyCallback when present
        self._generation_ready = False
        self.rollouts_generated = 0  # responses sampled since the start of training (checkpointed)
        self._eval_runs: dict[str, EvalRun] = {}  # the running validation / test / predict pass
        self.test_results: list[SourceResult] = []  # the last test pass, per source (every rank)
        self.predict_results: list[SourceResult] = []
        # No `save_hyperparameters` (issue 22): LightningCLI replaces the model's config with a checkpoint's
        # hyper-parameters on --ckpt_path, which silently changed the algorithm on resume. The run's settings are
        # recorded instead under `RUN_SETTINGS_KEY` (set by the CLI: every model, data and difficulty setting) and
        # a resume that differs is refused in `on_load_checkpoint`.
        self.run_settings: dict[str, Any] | None = None
        self.allow_changed_settings = False

    # ------------------------------------------------------------------------------------------------ setup
    @property
    def is_embedded(self) -> bool:
        return self.policy_path in EMBEDDED_POLICIES

    def pixel_budget(self, spec: VisionSpec) -> tuple[int, int]:
        """(min, max) pixels per image for a checkpoint whose processor has ``spec``: the configured values, else
        "auto": the authors' 262,144 .. 1,048,576 for a checkpoint that allows more than 1,048,576 (a stock
        Qwen2.5-VL processor allows 12.8 MP), the checkpoint's own budget otherwise (the embedded policy)."""
        cfg = self.policy_cfg
        auto = AUTHORS_PIXELS if spec.max_pixels > AUTHORS_PIXELS[1] else (spec.min_pixels, spec.max_pixels)
        return (cfg.min_pixels if cfg.min_pixels is not None else auto[0],
                cfg.max_pixels if cfg.max_pixels is not None else auto[1])

    @property
    def sharded(self) -> bool:
        """Whether the strategy applies FSDP2 in `configure_model` (Lightning's ModelParallelStrategy)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)

    @override
    def setup(self, stage: str) -> None:
        """Start-up checks that need the Trainer (strategy, precision): all problems in one message."""
        problems = sharding.check_strategy(self.trainer.strategy)
        precision = str(self.trainer.precision)
        problems += check_precision(self.policy_cfg.dtype, precision, sharded=self.sharded)
        if problems:
            raise ValueError("DivaGRPOModule: " + "; ".join(problems))
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "enforce_prompt_budget"):
            self._enforce_prompt_budget(datamodule)

    def _enforce_prompt_budget(self, datamodule: Any) -> None:
        """Every question's longest prompt must fit (before the model loads: tokenizer and config only)."""
        source, local = resolve_policy_source(self.policy_path)
        tokenizer, processor = load_tokenizer_and_processor(source, local_only=local)
        spec = VisionSpec.from_processor(processor)
        lo, hi = self.pixel_budget(spec)
        measure = PromptMeasure(tokenizer, self.prompt, replace(spec, min_pixels=lo, max_pixels=hi))
        config = AutoConfig.from_pretrained(source, local_files_only=local)
        context = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        budget = max(self.train_sampling.max_new_tokens, self.val_sampling.max_new_tokens)
        limit = prompt_limit(context=context, max_new_tokens=budget,
                             max_prompt_length=self.policy_cfg.max_prompt_length)

        def longest(record: Any, sizes: list[tuple[int, int]], with_variants: bool) -> int:
            return longest_prompt(record, measure, sizes, with_variants=with_variants)

        datamodule.enforce_prompt_budget(longest, limit, self.policy_cfg.prompt_overflow)

    # ------------------------------------------------------------------------------------------------ model
    def _load(self) -> PolicyBundle:
        bundle = load_policy(self.policy_path, dtype=self.policy_cfg.dtype, prompt=self.prompt,
                             attn_implementation=self.policy_cfg.attn_implementation)
        lo, hi = self.pixel_budget(bundle.vision_spec)
        bundle.set_pixel_budget(min_pixels=lo, max_pixels=hi)
        return bundle

    def _compute_dtype(self) -> torch.dtype | None:
        """The FSDP2 all-gather dtype: bf16 under bf16-mixed precision, else the stored dtype."""
        return torch.bfloat16 if str(self.trainer.precision) == "bf16-mixed" else None

    @override
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        cfg = self.policy_cfg
        self.bundle = bundle = self._load()
        model = bundle.model
        if cfg.freeze_vision_tower:
            for tower in sharding.vision_towers(model):
                tower.requires_grad_(False)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if cfg.lora is not None:
            lora = cfg.lora
            model = apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                               target_modules=lora.target_modules, include_vision=lora.include_vision)
            bundle.model = model
        if self.sharded:
            self._check_mesh()
            sharding.shard_policy(model, self.device_mesh["data_parallel"], param_dtype=self._compute_dtype())
        # load_policy returns an eval-mode model; the system trains it (the engine and Lightning's validation
        # loop switch to eval and back where needed).
        self.policy = model.train()
        if self.loss_cfg.kl_coef > 0 and cfg.lora is None:
            ref = self._load().model.requires_grad_(False).eval()
            if self.sharded:
                sharding.shard_policy(ref, self.device_mesh["data_parallel"], param_dtype=self._compute_dtype())
            object.__setattr__(self, "reference", ref)  # not a registered submodule: never trained or saved

    def _check_mesh(self) -> None:
        mesh = self.device_mesh
        dp = mesh["data_parallel"].size()
        if dp != self.trainer.world_size or mesh["tensor_parallel"].size() != 1:
            raise ValueError(f"ModelParallelStrategy: set data_parallel_size to the world size "
                             f"({self.trainer.world_size} = devices x num_nodes) and tensor_parallel_size to 1; got "
                             f"{dp} x {mesh['tensor_parallel'].size()} (experiments/fsdp.yaml)")

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        assert self.policy is not None
        return [p for p in self.policy.parameters() if p.requires_grad]

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.trainable_parameters()
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas}
        if needs_master_weights(self.policy_cfg.dtype):
            return MasterWeightAdamW(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _prepare_generation(self) -> None:
        """Once per process, when ranks and devices exist: the FSDP root forward and the engine's setup."""
        if self._generation_ready:
            return
        assert self.bundle is not None and self.policy is not None
        if self.reference is not None and not self.sharded:
            self.reference.to(self.device)
        if self.sharded:
            sharding.initialise_root(self.policy, pad_id=int(self.bundle.tokenizer.pad_token_id), device=self.device)
            if self.reference is not None:
                sharding.initialise_root(self.reference, pad_id=int(self.bundle.tokenizer.pad_token_id),
                                         device=self.device)
        self.engine.setup(self.bundle, rank=self.global_rank, world_size=self.trainer.world_size,
                          seed=stable_seed("engine", self.seed, self.global_rank), sharded=self.sharded)
        self._generation_ready = True

    def _engine_takes_weights(self) -> None:
        """An engine with its own copy of the weights (vLLM) takes the module's, which may have been restored from
        ``--ckpt_path`` after the engine's checkpoint was chosen: a resumed fit samples from the restored policy in
        its first round, and validate/test/predict score the checkpoint, not the base."""
        if not self.engine.samples_from_module:
            self.engine.sync_weights(self.policy)  # type: ignore[arg-type]

    @override
    def on_fit_start(self) -> None:
        self._prepare_generation()
        self._engine_takes_weights()

    @override
    def on_validation_start(self) -> None:
        self._prepare_generation()
        if self.trainer.state.fn != "fit":  # during fit the engine is already in sync (on_fit_start, wake)
            self._engine_takes_weights()

    @override
    def on_test_start(self) -> None:
        self._prepare_generation()
        self._engine_takes_weights()

    @override
    def on_predict_start(self) -> None:
        self._prepare_generation()
        self._engine_takes_weights()

    # ----------------------------------------------------------------------------------------------- rollout
    def _encode(self, batch: FamilyBatch) -> dict[str, Tensor]:
        assert self.bundle is not None
        return self.bundle.encode(batch.problems, batch.images_per_prompt())

    def _sample(self, inputs: dict[str, Tensor], sampling: SamplingConfig, num_generations: int, seed: int) -> Any:
        assert self.bundle is not None
        greedy = sampling.temperature <= 0
        return self.engine.generate(
            self.bundle, inputs, num_generations=num_generations, temperature=max(sampling.temperature, 1e-5),
            top_p=sampling.top_p, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy, seed=seed,
        )

    def _grade(self, texts: list[str], answers: list[str]) -> Any:
        return self.reward(texts, answers)

    # ---------------------------------------------------------------------------------------------- training
    def _rollout_round(self, batch: FamilyBatch, draw: int, timings: dict[str, float]) -> _Round:
        """Encode, sample G responses per prompt and grade them (seconds added to ``timings``)."""
        t = time.perf_counter()
        inputs = self._encode(batch)
        with torch.no_grad():  # the engine mixes in the rank
            roll = self._sample(inputs, self.train_sampling, self.num_generations,
                                stable_seed("rollout", self.seed, self.global_step, *(("draw", draw) if draw else ())))
        timings["rollout"] = timings.get("rollout", 0.0) + time.perf_counter() - t
        t = time.perf_counter()
        prompt_ids = roll.prompt_index.to(self.device)
        graded = self._grade(roll.texts, [batch.answers[i] for i in prompt_ids.tolist()])
        timings["reward"] = timings.get("reward", 0.0) + time.perf_counter() - t
        return _Round(batch, inputs, roll, graded)

    def _dynamic_sampling(self, first: _Round, timings: dict[str, float]) -> tuple[_Round, dict[str, float]]:
        """DAPO: keep whole groups with reward spread, draw more questions until the batch is full (or the budget
        is spent; then zero-spread groups fill it), every rank drawing as often as the neediest one."""
        ds = self.dynamic_sampling
        assert ds is not None
        family = ds.unit == "family"
        target = first.batch.num_questions if family else len(first.batch)
        rounds = [first]

        def filt(r: _Round) -> Any:
            values = r.graded.accuracy.to(r.rewards.device, torch.float32) if ds.metric == "accuracy" else r.rewards
            return spread_filter(values, r.prompt_ids, family_ids=r.family_ids if family else None)

        filters = [filt(first)]
        while len(rounds) < ds.max_draws and self._min_over_ranks(sum(f.num_spread_units for f in filters)) < target:
            extra = self.trainer.datamodule.side_stream.draw(self.device)
            rounds.append(self._rollout_round(extra, len(rounds), timings))
            filters.append(filt(rounds[-1]))
        selection = select_units(filters, target)
        merged = _Round.merge(rounds, selection.keep, pad_id=int(self.bundle.tokenizer.pad_token_id))  # type: ignore[union-attr]
        merged.inputs = self._encode(merged.batch)
        stats = {
            "dynamic_sampling/draws": float(len(rounds)),
            "dynamic_sampling/generated_rollouts": float(selection.generated_rollouts),
            "dynamic_sampling/kept_rollouts": float(selection.kept_rollouts),
            "dynamic_sampling/filled_units": float(selection.num_filled),
            "dynamic_sampling/frac_spread_units": selection.spread_units / max(selection.generated_units, 1),
        }
        return merged, stats

    def _min_over_ranks(self, value: int) -> int:
        if self.trainer.world_size == 1 or not torch.distributed.is_initialized():
            return value
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t)

    @override
    def training_step(self, batch: FamilyBatch, batch_idx: int) -> dict[str, Any]:
        assert self.bundle is not None and self.policy is not None
        timings: dict[str, float] = {}
        round_ = self._rollout_round(batch, 0, timings)
        sampling_stats: dict[str, float] = {}
        if self.dynamic_sampling is not None:
            round_, sampling_stats = self._dynamic_sampling(round_, timings)
        generated = sampling_stats.get("dynamic_sampling/generated_rollouts", float(round_.roll.num_responses))
        self.rollouts_generated += int(generated)

        batch, inputs, roll, graded = round_.batch, round_.inputs, round_.roll, round_.graded
        prompt_ids, family_ids, rewards = round_.prompt_ids, round_.family_ids, round_.rewards
        accuracy = graded.accuracy.to(self.device, torch.float32)
        t = time.perf_counter()
        labels = batch.difficulty[prompt_ids]
        advantages = self.advantage(rewards, prompt_ids, family_ids, labels).to(torch.float32)
        timings["advantage"] = time.perf_counter() - t

        t = time.perf_counter()
        self.policy.train()
        self.engine.sleep()
        update_stats = self._update(inputs, roll, advantages)
        self.engine.wake()
        timings["update"] = time.perf_counter() - t

        n = roll.num_responses
        self.log_dict({**update_stats, **sampling_stats}, on_step=True, on_epoch=False, prog_bar=False, batch_size=n)
        for part in batch.meta.get("parts", [batch.meta]):
            for kind, count in part.get("fallbacks", {}).items():
                self.log(f"data/variant_fallbacks/{kind}", float(count), on_step=True, on_epoch=False, batch_size=n)
        # rollouts generated so far over all ranks (dynamic sampling's dropped draws included): what budgets compare.
        # Every rank draws as often as the others and each draw has the same size, so it is rank count x world.
        self.log("rollouts/generated", float(self.rollouts_generated * self.trainer.world_size), on_step=True,
                 on_epoch=False)
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        self.log("reward", rewards.mean(), on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        if roll.finished is not None:  # TRL's name: responses cut at max_new_tokens
            clipped = (~roll.finished).float().mean()
            self.log("completions/clipped_ratio", clipped, on_step=True, on_epoch=False, batch_size=n)
        return {
            "rewards": rewards.detach(),
            "accuracy": accuracy.detach(),
            "format": graded.format.detach(),
            "prompt_ids": prompt_ids,
            "family_ids": family_ids,
            "is_original": batch.is_original[prompt_ids],
            "tier": batch.tier[prompt_ids],
            "kind": batch.kind[prompt_ids],
            "difficulty": labels,
            "question_ids": [batch.question_ids[i] for i in prompt_ids.tolist()],
            "completion_lengths": roll.completion_mask.sum(-1),
            "truncated": ~roll.finished.to(self.device) if roll.finished is not None else None,
            "advantages": advantages.detach(),
            "timings": timings,
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["diva_rollouts_generated"] = self.rollouts_generated
        if self.run_settings is not None:
            checkpoint[RUN_SETTINGS_KEY] = self.run_settings

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and self.run_settings is not None and not self.allow_changed_settings:
            check_resume_settings(checkpoint, self.run_settings, self.trainer.ckpt_path)
        self.rollouts_generated = int(checkpoint.get("diva_rollouts_generated", 0))

    def _score(self, model: torch.nn.Module, inputs: dict[str, Tensor], roll: Any, rows: list[int], *,
               entropy: bool = False, images: StepImages | None = None) -> tuple[Tensor, Tensor | None]:
        ids = roll.completion_ids.to(self.device)[rows]
        mask = roll.completion_mask.to(self.device)[rows]
        index = roll.prompt_index.to(self.device)[rows]
        temperature = max(self.train_sampling.temperature, 1e-5)
        if self.policy_cfg.padding_free:  # packed, each distinct image once, a dummy image keeps FSDP ranks in step
            # flash-attention's varlen kernels attend within each sequence only: everything in one row, no pad
            one_row = (self.policy_cfg.attn_implementation or "").startswith("flash")
            return packed_logprobs(model, inputs, ids, mask, prompt_index=index, temperature=temperature,
                                   with_entropy=entropy, sync_vision=self.sharded, images=images,
                                   pack_width=sys.maxsize if one_row else None)
        return completion_logprobs(model, inputs, ids, mask, prompt_index=index, temperature=temperature,
                                   with_entropy=entropy)

    def _layout(self, inputs: dict[str, Tensor], roll: Any) -> dict[str, Tensor]:
        """Each response's real token count and prompt: what a token-budget micro-batch is formed from."""
        index = roll.prompt_index.to(self.device)
        return {"seq_lens": sequence_lengths(inputs, index, roll.completion_mask.to(self.device)), "groups": index}

    @torch.no_grad()
    def _score_all(self, model: torch.nn.Module, inputs: dict[str, Tensor], roll: Any) -> Tensor:
        n = roll.num_responses
        if self.update.max_tokens is None:
            step = self.update.micro_batch_size or self.update.mini_batch_size or n
            parts = [list(range(s, min(s + step, n))) for s in range(0, n, step)]
        else:
            layout = UpdateBatch(advantages=torch.zeros(n), mask=roll.completion_mask.bool(),
                                 **self._layout(inputs, roll))
            parts = self.update.micro_batches(list(range(n)), layout, _Hooks(self, inputs, roll))
        # no gradient: every distinct image of the step is encoded once for all micro-batches
        images = step_images(model, inputs, sync_vision=self.sharded) if self.policy_cfg.padding_free else None
        out = torch.zeros(roll.completion_ids.shape, dtype=torch.float32, device=self.device)
        for rows in parts:
            out[rows] = self._score(model, inputs, roll, rows, images=images)[0]
        return out

    def _reference_logp(self, inputs: dict[str, Tensor], roll: Any) -> Tensor | None:
        if self.loss_cfg.kl_coef <= 0:
            return None
        if self.reference is not None:
            return self._score_all(self.reference, inputs, roll)
        assert self.policy is not None and is_lora(self.policy)
        with self.policy.disable_adapter():  # the base model, adapters off, is the reference under LoRA
            return self._score_all(self.policy, inputs, roll)

    def _update(self, inputs: dict[str, Tensor], roll: Any, advantages: Tensor) -> dict[str, float]:
        """Old and reference log-probs, the correction weights, then the PPO update; returns its statistics."""
        n = advantages.numel()
        mask = roll.completion_mask.to(self.device).bool()
        if self.loss_cfg.mask_truncated_completions and roll.finished is not None:
            mask = truncation_mask(mask, roll.finished.to(self.device))
        on_policy = self.engine.samples_from_module and self.update.single_step(n)
        stats: dict[str, float] = {}
        old_logp = None if on_policy else self._score_all(self.policy, inputs, roll)  # type: ignore[arg-type]
        is_weights = None
        if self.correction is not None and roll.old_logp is not None:
            trainer_logp = old_logp if old_logp is not None else self._score_all(self.policy, inputs, roll)  # type: ignore[arg-type]
            c = self.correction
            is_weights, cstats = importance_weights(trainer_logp, roll.old_logp.to(self.device), mask,
                                                    level=c.level, mode=c.mode, cap=c.cap)
            stats.update(cstats.metrics())
        batch = UpdateBatch(advantages=advantages, mask=mask, old_logp=old_logp,
                            ref_logp=self._reference_logp(inputs, roll), is_weights=is_weights,
                            **self._layout(inputs, roll))
        g = torch.Generator().manual_seed(stable_seed("minibatch", self.seed, self.global_step, self.global_rank))
        hooks = _Hooks(self, inputs, roll)
        stats.update(self.update.run(batch, hooks, generator=g))
        finite = [x for x in hooks.grad_norms if math.isfinite(x)]
        stats["grad_norm"] = sum(finite) / len(finite) if finite else math.nan  # before clipping, of the steps taken
        stats["skipped_steps"] = float(len(hooks.grad_norms) - len(finite))  # non-finite norm: step skipped
        return stats

    def _global_token_count(self, mask: Tensor) -> float:
        """Tokens of this mini-batch over all ranks, divided by the world size.

        Data parallelism averages gradients over ranks, so dividing each rank's token sum by (global tokens /
        world size) makes the averaged gradient the exact global token mean.
        """
        local = mask.sum().to(torch.float64)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            local = self.trainer.strategy.reduce(local, reduce_op="sum")
        return max(float(local) / world, 1.0)

    def _optimizer_step(self) -> float:
        """Clip (on the model's gradients: correct for sharded DTensors and float32 masters alike), step, zero,
        and push the new weights to an engine that keeps its own copy. Returns the gradient norm."""
        opt = self.optimizers()
        params = self.trainable_parameters()
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if isinstance(norm, sharding.DTensor) else norm
        taken = bool(torch.isfinite(norm))
        if not taken:
            # skip the update, as the authors' dp_actor.py:163 (logged as skipped_steps): without gradients AdamW
            # leaves every parameter and its state as they are, and the step still counts for global_step
            opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if taken and not self.engine.samples_from_module:  # a skipped step changed no weight: nothing to push
            self.engine.sync_weights(self.policy)  # type: ignore[arg-type]
        return float(norm)

    # -------------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: FamilyBatch, stage: str, batch_idx: int, dataloader_idx: int) -> list[dict[str, str]]:
        """Sample `val_sampling.num_samples` responses per question and grade them by the source's rule."""
        assert self.policy is not None
        self.policy.eval()
        with torch.no_grad():
            roll = self._sample(self._encode(batch), self.val_sampling, self.val_sampling.num_samples,
                                stable_seed("eval", self.seed, stage, dataloader_idx, batch_idx))
        if batch.meta.get("padding"):  # generated only to keep sharded ranks in step
            return []
        if stage not in self._eval_runs:  # the epoch-start hook did not run (a loop driven by hand)
            self._start_eval(stage)
        return self._eval_runs[stage].add(dataloader_idx, batch, roll.prompt_index.tolist(), roll.texts,
                                          reward=None if stage == "predict" else self.reward, where=stage)

    def _start_eval(self, stage: str) -> None:
        self._eval_runs[stage] = EvalRun(sources_of(self.trainer.datamodule, stage))

    def _finish_eval(self, stage: str) -> list[SourceResult]:
        """Gather every rank's responses, compute each source's metrics, and (val/test) log the same values on
        every rank."""
        run = self._eval_runs.pop(stage, None) or EvalRun(sources_of(self.trainer.datamodule, stage))
        run.gather()
        results = run.results(graded=stage != "predict")
        if stage != "predict":
            for key, value in log_values(stage, results).items():
                self.log(key, value, prog_bar=key == f"{stage}/accuracy", sync_dist=False)
        return results

    @override
    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    @override
    def validation_step(self, batch: FamilyBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val", batch_idx, dataloader_idx)

    @override
    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    @override
    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    @override
    def test_step(self, batch: FamilyBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test", batch_idx, dataloader_idx)

    @override
    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish_eval("test")

    @override
    def on_predict_epoch_start(self) -> None:
        self._start_eval("predict")

    @override
    def predict_step(self, batch: FamilyBatch, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        """``{"id", "response"}`` rows of the batch (`num_samples` per question), as the ``score`` command reads."""
        return self._evaluate(batch, "predict", batch_idx, dataloader_idx)

    @override
    def on_predict_epoch_end(self) -> None:
        self.predict_results = self._finish_eval("predict")

    # ------------------------------------------------------------------------------------------------ export
    def export_state_dict(self) -> dict[str, Tensor]:
        """The policy's full weights in the base model's names, LoRA adapters merged.

        Collective under FSDP (every rank must call it); only rank 0 receives the tensors there.
        """
        assert self.policy is not None
        state = sharding.full_state_dict(self.policy)
        if state and is_lora(self.policy):
            state = merge_lora_state_dict(state, scale=lora_scale(self.policy))
        return state

    def export_policy(self, out_dir: str | Path) -> Path | None:
        """Write the policy as a standard `save_pretrained` folder that `load_policy` reads.

        Every rank must call it (the full weights are gathered from the shards); rank 0 writes and gets the
        path, the other ranks get None.
        """
        assert self.bundle is not None and self.policy is not None
        state = self.export_state_dict()
        if self._trainer is not None and self.trainer.global_rank != 0:
            return None
        base = self.policy.get_base_model() if is_lora(self.policy) else self.policy
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        base.save_pretrained(out, state_dict=state)
        self.bundle.tokenizer.save_pretrained(out)
        self.bundle.image_processor.save_pretrained(out)
        return out


class _Hooks:
    """`training.ppo.UpdateHooks` on the LightningModule: scoring, manual backward, the optimizer step."""

    def __init__(self, module: DivaGRPOModule, inputs: dict[str, Tensor], roll: Any) -> None:
        self.module, self.inputs, self.roll = module, inputs, roll
        self.grad_norms: list[float] = []

    def score(self, rows: list[int], *, entropy: bool) -> tuple[Tensor, Tensor | None]:
        assert self.module.policy is not None
        with torch.enable_grad():
            return self.module._score(self.module.policy, self.inputs, self.roll, rows, entropy=entropy)

    def backward(self, loss: Tensor) -> None:
        self.module.manual_backward(loss)

    def step(self) -> None:
        self.grad_norms.append(self.module._optimizer_step())

    def token_denominator(self, mask: Tensor) -> float:
        return self.module._global_token_count(mask)

    def max_over_ranks(self, value: int) -> int:
        return -self.module._min_over_ranks(-value)


@dataclass
class _Round:
    """One rollout round: the prompts, their encoding, the responses and their grades."""

    batch: FamilyBatch
    inputs: dict[str, Tensor]
    roll: Rollout
    graded: Any

    @property
    def prompt_ids(self) -> Tensor:
        return self.roll.prompt_index.to(self.batch.family_index.device)

    @property
    def family_ids(self) -> Tensor:
        return self.batch.family_index[self.prompt_ids]

    @property
    def rewards(self) -> Tensor:
        return self.graded.reward.to(self.batch.family_index.device, torch.float32)

    @staticmethod
    def merge(rounds: list[_Round], keep: list[Tensor], *, pad_id: int) -> _Round:
        """The kept responses of several rounds as one (``inputs`` must be re-encoded by the caller)."""
        parts, rolls, grades = [], [], []
        offset = 0
        for r, mask in zip(rounds, keep):
            rows = mask.nonzero().flatten().tolist()
            prompts = list(dict.fromkeys(int(r.roll.prompt_index[i]) for i in rows))  # whole groups, in order
            new_index = {p: offset + k for k, p in enumerate(prompts)}
            offset += len(prompts)
            parts.append((r.batch, prompts))
            index = torch.tensor([new_index[int(r.roll.prompt_index[i])] for i in rows], dtype=torch.long)
            rolls.append(r.roll.select(rows, index))
            grades.append([getattr(r.graded, f)[rows] for f in ("reward", "accuracy", "format")])
        graded = RewardBreakdown(*(torch.cat([g[k] for g in grades]) for k in range(3)))
        return _Round(merge_families(parts), {}, Rollout.cat(rolls, pad_id=pad_id), graded)
