"""`DivaGRPOModule`: the training system (rollout -> rewards -> advantages -> policy update) as Lightning hooks.

The policy, the rollout engine, the reward and the advantage estimator are injected components; the work lives
beside this file: `round.py` (one training round, design.md section 2), `stages.py` (its typed hand-offs),
`scoring.py` (log-probs and the PPO update's host), `dynamic.py` (DAPO dynamic sampling, the one reader of the
data module's side stream), `evaluating.py` (validation/test/predict) and `policy_setup.py` (loading, LoRA, FSDP2,
export). The math lives in `diva_lightning.core`, the update loop in `diva_lightning.training.ppo`.

The evaluation hooks come from `evaluating.EvaluationHooks`. `training_step` returns the round's
`callbacks.outputs.StepOutputs` as a dict (Lightning's manual optimization takes a dict or None). Test and predict
results are kept in `test_results` / `predict_results` for the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from diva_lightning.data.batch import FamilyBatch
from diva_lightning.evaluation.run import SourceResult
from diva_lightning.models.embedded import EMBEDDED
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.models.prompt import PromptConfig
from diva_lightning.rewards import CombinedReward, Reward
from diva_lightning.rollout.base import RolloutEngine
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.system import policy_setup as setup_
from diva_lightning.system.checkpointing import RUN_SETTINGS_KEY, check_resume_settings
from diva_lightning.system.dynamic import DynamicSampler, side_stream_of
from diva_lightning.system.evaluating import EvaluationHooks, Evaluator
from diva_lightning.system.policy_setup import AUTHORS_PIXELS, EMBEDDED_POLICIES
from diva_lightning.system.round import RoundRunner, log_round
from diva_lightning.system.settings import check_settings
from diva_lightning.training import sharding
from diva_lightning.training.config import (
    CorrectionConfig,
    DynamicSamplingConfig,
    LossConfig,
    PolicyConfig,
    SamplingConfig,
)
from diva_lightning.training.estimators import AdvantageEstimator, DivaAdvantage
from diva_lightning.training.precision import MasterWeightAdamW, check_precision, needs_master_weights

__all__ = ["AUTHORS_PIXELS", "EMBEDDED_POLICIES", "CorrectionConfig", "DivaGRPOModule", "DynamicSamplingConfig",
           "LossConfig", "PolicyConfig", "SamplingConfig"]


class DivaGRPOModule(EvaluationHooks):
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

    def __init__(self, policy: str = EMBEDDED, prompt: PromptConfig | None = None,
                 policy_config: PolicyConfig | None = None, advantage: AdvantageEstimator | None = None,
                 reward: Reward | None = None, rollout: RolloutEngine | None = None, num_generations: int = 5,
                 train_sampling: SamplingConfig | None = None, val_sampling: SamplingConfig | None = None,
                 loss: LossConfig | None = None, rollout_correction: CorrectionConfig | None = None,
                 dynamic_sampling: DynamicSamplingConfig | None = None, ppo_epochs: int = 1,
                 mini_batch_size: int | None = None, micro_batch_size: int | None = None, lr: float = 1e-6,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0,
                 seed: int = 0) -> None:
        super().__init__()
        self.policy_path = policy
        self.prompt = prompt or PromptConfig()
        self.policy_cfg = policy_config or PolicyConfig()
        self.train_sampling = train_sampling or SamplingConfig()
        self.val_sampling = val_sampling or SamplingConfig(temperature=0.0, top_p=1.0)
        self.loss_cfg = loss or LossConfig()
        self.correction = rollout_correction
        self.update = check_settings(self, dynamic_sampling, num_generations, lr, grad_clip, ppo_epochs=ppo_epochs,
                                     mini_batch_size=mini_batch_size, micro_batch_size=micro_batch_size)
        self.automatic_optimization = False
        self.advantage = advantage if advantage is not None else DivaAdvantage()
        self.reward = reward if reward is not None else CombinedReward()
        self.engine: RolloutEngine = rollout if rollout is not None else HFGenerateEngine()
        self.sampler = DynamicSampler(dynamic_sampling) if dynamic_sampling is not None else None
        self.num_generations, self.seed = num_generations, seed
        self.lr, self.weight_decay, self.betas, self.grad_clip = lr, weight_decay, tuple(betas), grad_clip
        self.bundle: PolicyBundle | None = None
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.rollouts_generated = 0  # responses sampled since the start of training (checkpointed)
        self.evaluator = Evaluator()
        self.test_results: list[SourceResult] = []  # the last test pass, per source (every rank)
        self.predict_results: list[SourceResult] = []
        # No `save_hyperparameters` (issue 22): LightningCLI would replace the model's config with a checkpoint's on
        # --ckpt_path. The CLI records the run's settings here instead (saved under `RUN_SETTINGS_KEY`) and a
        # resume that differs is refused in `on_load_checkpoint`.
        self.run_settings: dict[str, Any] | None = None
        self.allow_changed_settings = False
        self._generation_ready = False

    # ------------------------------------------------------------------------------------ what the stages read
    @property
    def dynamic_sampling(self) -> DynamicSamplingConfig | None:
        return self.sampler.config if self.sampler is not None else None

    @property
    def is_embedded(self) -> bool:
        return self.policy_path in EMBEDDED_POLICIES

    @property
    def sharded(self) -> bool:
        """Whether the strategy applies FSDP2 in `configure_model` (Lightning's ModelParallelStrategy)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def reduce_sum(self, value: Tensor) -> Tensor:
        """``value`` summed over ranks (through the strategy)."""
        return self.trainer.strategy.reduce(value, reduce_op="sum")

    @property
    def rounds(self) -> RoundRunner:
        """The round's stages on this module (`encode`, `sample`, `grade`, `advantages`, `update`, `run`)."""
        return RoundRunner(self, self.sampler)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        assert self.policy is not None
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------------ setup
    @override
    def setup(self, stage: str) -> None:
        """Start-up checks that need the Trainer (strategy, precision; all problems in one message), the prompt
        budget, and the side stream bound to dynamic sampling."""
        problems = sharding.check_strategy(self.trainer.strategy)
        problems += check_precision(self.policy_cfg.dtype, str(self.trainer.precision), sharded=self.sharded)
        if problems:
            raise ValueError("DivaGRPOModule: " + "; ".join(problems))
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "enforce_prompt_budget"):
            budget = max(self.train_sampling.max_new_tokens, self.val_sampling.max_new_tokens)
            setup_.enforce_prompt_budget(datamodule, self.policy_path, self.policy_cfg, self.prompt, budget)
        if self.sampler is not None and stage == "fit" and self.sampler.config.max_draws > 1:
            # refused here, before training, rather than at the first extra draw
            self.sampler.bind(side_stream_of(datamodule))

    @override
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        mesh = None
        if self.sharded:
            setup_.check_mesh(self.device_mesh, self.trainer.world_size)
            mesh = self.device_mesh["data_parallel"]
        bf16 = self._trainer is not None and str(self.trainer.precision) == "bf16-mixed"  # FSDP2 all-gather dtype
        built = setup_.build_policy(self.policy_path, self.policy_cfg, self.prompt, mesh=mesh,
                                    with_reference=self.loss_cfg.kl_coef > 0,
                                    param_dtype=torch.bfloat16 if bf16 else None)
        self.bundle, self.policy = built.bundle, built.policy
        object.__setattr__(self, "reference", built.reference)  # not a registered submodule: never trained or saved

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = self.trainable_parameters()
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay, "betas": self.betas}
        if needs_master_weights(self.policy_cfg.dtype):
            return MasterWeightAdamW(params, **kwargs)
        return torch.optim.AdamW(params, **kwargs)

    def _start_generation(self, *, take_weights: bool = True) -> None:
        """Once per process (ranks and devices exist): the FSDP root forward and the engine's set-up. Then an engine
        with its own copy of the weights (vLLM) takes the module's, which may have been restored from --ckpt_path."""
        if not self._generation_ready:
            setup_.prepare_generation(self)
            self._generation_ready = True
        if take_weights and not self.engine.samples_from_module:
            self.engine.sync_weights(self.policy)  # type: ignore[arg-type]

    @override
    def on_fit_start(self) -> None:
        self._start_generation()

    @override
    def on_validation_start(self) -> None:
        self._start_generation(take_weights=self.trainer.state.fn != "fit")  # in fit the engine is in sync

    @override
    def on_test_start(self) -> None:
        self._start_generation()

    @override
    def on_predict_start(self) -> None:
        self._start_generation()

    # ---------------------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: FamilyBatch, batch_idx: int) -> dict[str, Any]:
        assert self.bundle is not None and self.policy is not None
        result = self.rounds.run(batch)
        self.rollouts_generated += result.sampled.generated
        log_round(self, result, rollouts_generated=self.rollouts_generated)
        return result.outputs(self.device).as_dict()

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

    # ------------------------------------------------------------------------------------------------ export
    def export_policy(self, out_dir: str | Path) -> Path | None:
        """Write the policy as a `save_pretrained` folder (every rank must call it; rank 0 writes, gets the path)."""
        assert self.bundle is not None and self.policy is not None
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return setup_.export_policy(self.bundle, self.policy, out_dir, rank=rank)
