"""`DivaGRPOModule`: the training system (rollout -> rewards -> advantages -> clipped policy update).

The policy, the rollout engine, the reward and the advantage estimator are injected components; this class only
orchestrates them. The math lives in `diva_lightning.core` and is never re-derived here.

One `training_step` is one DIVA round (design.md section 2):
1. encode the batch's prompts (original + variants; images already perturbed on the device),
2. sample G responses per prompt (`rollout`),
3. grade them (`reward`: shaped reward and its accuracy/format parts),
4. advantages from the estimator (DIVA: local + global, batch z-score, difficulty weight, RRB),
5. `ppo_epochs` passes over shuffled mini-batches of `mini_batch_size` responses, one optimizer step each,
   gradient accumulated over micro-batches of `micro_batch_size`; `token_mean` is exact across micro-batches
   and ranks (the global token count is passed to the loss),
6. return per-response outputs; `DifficultyCallback` and `AdvantageMonitor` consume them.

Deviation from the official code, on purpose: the rollout of step s is sampled under an RNG seeded by
(seed, s, rank) inside `torch.random.fork_rng`, so a resumed run samples exactly what an uninterrupted run would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import MeanMetric
from typing_extensions import override

from diva_lightning.algorithms import AdvantageEstimator, DivaAdvantage
from diva_lightning.core.loss import policy_loss
from diva_lightning.core.seeding import stable_seed
from diva_lightning.data.batch import FamilyBatch
from diva_lightning.models.logprobs import completion_logprobs
from diva_lightning.models.policy import PolicyBundle, load_policy
from diva_lightning.models.prompt import PromptConfig
from diva_lightning.rewards import CombinedReward
from diva_lightning.rollout.base import RolloutEngine
from diva_lightning.rollout.hf import HFGenerateEngine

log = logging.getLogger(__name__)

MAX_LEVEL = 10  # per-level validation metrics are kept for intrinsic levels 1..MAX_LEVEL


@dataclass
class LossConfig:
    """Policy-loss settings (design.md section 6)."""

    clip_low: float = 0.2
    """Lower PPO clip (ratio >= 1 - clip_low)."""
    clip_high: float = 0.3
    """Upper PPO clip (ratio <= 1 + clip_high); official 0.3."""
    dual_clip: float | None = 3.0
    """Dual-clip constant c for negative advantages; null turns it off."""
    agg: str = "token_mean"
    """token_mean | seq_mean_token_mean | seq_mean_token_sum_norm."""
    kl_coef: float = 0.0
    """Weight of the KL to the frozen reference policy (0 = no reference model is loaded)."""
    kl_type: str = "k3"
    """k1 | k3 (low_var_kl)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""


@dataclass
class SamplingConfig:
    """Decoding settings for rollouts or evaluation."""

    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 64
    """Maximum response length in tokens."""
    num_samples: int = 1
    """Evaluation only: responses per question, accuracy averaged over them (mean@k; needs temperature > 0 when
    above 1). Rollouts use ``num_generations`` instead, so ``train_sampling`` must leave it at 1."""




class DivaGRPOModule(pl.LightningModule):
    """GRPO-family RL for vision-language policies, with DIVA as the default estimator.

    Args:
        policy: a local checkpoint directory (the tiny embedded policy or e.g. a Qwen2.5-VL-7B copy) or a hub id.
        prompt: the format instruction appended to every problem and variant, and the system turn.
        advantage: the estimator component (`DivaAdvantage` or `GRPOAdvantage`, by class_path).
        reward: the reward component (shaped reward with accuracy and format parts).
        rollout: the generation engine (`HFGenerateEngine`, or `VLLMEngine` on a CUDA machine).
        num_generations: G, responses per prompt.
        train_sampling: rollout decoding (paper: temperature 1.0).
        val_sampling: evaluation decoding (paper: temperature 0.6, top_p 0.95; 0 = greedy).
        loss: clipping, aggregation, KL and entropy settings.
        ppo_epochs: passes over each round's responses.
        mini_batch_size: responses per optimizer step (None: all responses of the round, one step per epoch).
        micro_batch_size: responses per forward/backward (memory knob; None: the whole mini-batch).
        lr / weight_decay / betas: AdamW (paper: lr 1e-6, constant schedule).
        grad_clip: max gradient norm (paper: 1.0; 0 disables).
        seed: seeds the per-step rollout RNG (linked from `seed_everything`).
        dtype: policy weights dtype ("float32" or "bfloat16").
    """

    def __init__(
        self,
        policy: str = "artifacts/base_policy",
        prompt: PromptConfig | None = None,
        advantage: AdvantageEstimator | None = None,
        reward: CombinedReward | None = None,
        rollout: RolloutEngine | None = None,
        num_generations: int = 5,
        train_sampling: SamplingConfig | None = None,
        val_sampling: SamplingConfig | None = None,
        loss: LossConfig | None = None,
        ppo_epochs: int = 1,
        mini_batch_size: int | None = None,
        micro_batch_size: int | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float = 1.0,
        seed: int = 0,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        problems = []
        if num_generations < 1:
            problems.append(f"num_generations must be >= 1, got {num_generations}")
        if ppo_epochs < 1:
            problems.append(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        for name, value in (("mini_batch_size", mini_batch_size), ("micro_batch_size", micro_batch_size)):
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 or null, got {value}")
        if dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if train_sampling is not None and train_sampling.num_samples != 1:
            problems.append("train_sampling.num_samples must stay 1 (rollouts draw num_generations per prompt)")
        if val_sampling is not None and val_sampling.num_samples < 1:
            problems.append(f"val_sampling.num_samples must be >= 1, got {val_sampling.num_samples}")
        elif val_sampling is not None and val_sampling.num_samples > 1 and val_sampling.temperature <= 0:
            problems.append("val_sampling.num_samples > 1 needs temperature > 0 (greedy answers are all the same)")
        if problems:
            raise ValueError("DivaGRPOModule: " + "; ".join(problems))
        self.automatic_optimization = False
        self.policy_path = policy
        self.prompt = prompt or PromptConfig()
        self.advantage = advantage if advantage is not None else DivaAdvantage()
        self.reward = reward if reward is not None else CombinedReward()
        self.engine: RolloutEngine = rollout if rollout is not None else HFGenerateEngine()
        self.num_generations = num_generations
        self.train_sampling = train_sampling or SamplingConfig()
        self.val_sampling = val_sampling or SamplingConfig(temperature=0.0, top_p=1.0)
        self.loss_cfg = loss or LossConfig()
        self.ppo_epochs, self.mini_batch_size, self.micro_batch_size = ppo_epochs, mini_batch_size, micro_batch_size
        self.lr, self.weight_decay, self.betas, self.grad_clip = lr, weight_decay, tuple(betas), grad_clip
        self.seed, self.dtype_name = seed, dtype
        self.bundle: PolicyBundle | None = None
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.difficulty_table: Any = None  # attached by DifficultyCallback when present
        self.val_accuracy = MeanMetric()
        self.val_format = MeanMetric()
        self.val_level = torch.nn.ModuleList([MeanMetric() for _ in range(MAX_LEVEL)])
        self._val_level_seen: set[int] = set()
        # Components are recorded by the CLI's config.yaml (class_path + init_args), not as hparams.
        self.save_hyperparameters(ignore=["advantage", "reward", "rollout"])

    # ------------------------------------------------------------------------------------------------ model
    @override
    def configure_model(self) -> None:
        if self.policy is not None:
            return
        dtype = getattr(torch, self.dtype_name)
        self.bundle = load_policy(self.policy_path, dtype=dtype, prompt=self.prompt)
        # load_policy returns an eval-mode model; the system trains it (the engine and Lightning's validation
        # loop switch to eval and back where needed).
        self.policy = self.bundle.model.train()
        if self.loss_cfg.kl_coef > 0:
            ref = load_policy(self.policy_path, dtype=dtype).model
            ref.requires_grad_(False).eval()
            object.__setattr__(self, "reference", ref)  # not a registered submodule: never trained or saved

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        assert self.policy is not None
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    @override
    def on_fit_start(self) -> None:
        if self.reference is not None:
            self.reference.to(self.device)

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
    @override
    def training_step(self, batch: FamilyBatch, batch_idx: int) -> dict[str, Any]:
        assert self.bundle is not None and self.policy is not None
        timings: dict[str, float] = {}
        t = time.perf_counter()
        inputs = self._encode(batch)
        with torch.no_grad():
            roll = self._sample(inputs, self.train_sampling, self.num_generations,
                                stable_seed("rollout", self.seed, self.global_step, self.global_rank))
        timings["rollout"] = time.perf_counter() - t

        t = time.perf_counter()
        prompt_ids = roll.prompt_index.to(self.device)
        answers = [batch.answers[i] for i in prompt_ids.tolist()]
        graded = self._grade(roll.texts, answers)
        rewards = graded.reward.to(self.device, torch.float32)
        accuracy = graded.accuracy.to(self.device, torch.float32)
        timings["reward"] = time.perf_counter() - t

        t = time.perf_counter()
        family_ids = batch.family_index[prompt_ids]
        labels = batch.difficulty[prompt_ids]
        advantages = self.advantage(rewards, prompt_ids, family_ids, labels).to(torch.float32)
        timings["advantage"] = time.perf_counter() - t

        t = time.perf_counter()
        self.policy.train()
        update_stats = self._update(inputs, roll, advantages)
        timings["update"] = time.perf_counter() - t

        mask = roll.completion_mask
        self.log_dict(update_stats, on_step=True, on_epoch=False, prog_bar=False, batch_size=len(answers))
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False)
        self.log("reward", rewards.mean(), on_step=True, on_epoch=False, prog_bar=True, batch_size=len(answers))
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
            "completion_lengths": mask.sum(-1),
            "advantages": advantages.detach(),
            "timings": timings,
        }

    def _update(self, inputs: dict[str, Tensor], roll: Any, advantages: Tensor) -> dict[str, float]:
        """PPO epochs over mini-batches, one optimizer step each; returns averaged loss statistics."""
        assert self.bundle is not None and self.policy is not None
        opt = self.optimizers()
        n = advantages.numel()
        mini = self.mini_batch_size or n
        micro = self.micro_batch_size or mini
        mask = roll.completion_mask.to(self.device)
        ids = roll.completion_ids.to(self.device)
        prompt_index = roll.prompt_index.to(self.device)
        temperature = max(self.train_sampling.temperature, 1e-5)

        def score(idx: list[int], model: torch.nn.Module, *, grad: bool, entropy: bool = False
                  ) -> tuple[Tensor, Tensor | None]:
            with torch.set_grad_enabled(grad):
                return completion_logprobs(model, inputs, ids[idx], mask[idx], prompt_index=prompt_index[idx],
                                           temperature=temperature, with_entropy=entropy)

        def score_all(model: torch.nn.Module) -> Tensor:
            return torch.cat([score(list(range(s, min(s + micro, n))), model, grad=False)[0]
                              for s in range(0, n, micro)])

        # Old log-probs of the sampling policy: from the engine when it provides them; when the round is a
        # single optimizer step (one PPO epoch, one mini-batch) the weights have not moved since sampling, so
        # old = current log-probs, taken detached from the same forward (ratio exactly 1, no extra pass);
        # otherwise recomputed once before the first step.
        on_policy = self.ppo_epochs == 1 and mini >= n
        if roll.old_logp is not None:
            old_logp: Tensor | None = roll.old_logp.to(self.device)
        else:
            old_logp = None if on_policy else score_all(self.policy)
        ref_logp = score_all(self.reference) if self.reference is not None else None

        cfg = self.loss_cfg
        g = torch.Generator().manual_seed(stable_seed("minibatch", self.seed, self.global_step, self.global_rank))
        per_step: list[dict[str, float]] = []
        want_entropy = cfg.entropy_coef > 0
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n, generator=g).tolist() if mini < n else list(range(n))
            for s in range(0, n, mini):
                mb = order[s : s + mini]
                num_tokens = self._global_token_count(mask[mb])
                opt.zero_grad(set_to_none=True)
                micro_stats: list[tuple[dict[str, float], float]] = []
                for m in range(0, len(mb), micro):
                    idx = mb[m : m + micro]
                    logp, ent = score(idx, self.policy, grad=True, entropy=want_entropy)
                    old = logp.detach() if old_logp is None else old_logp[idx]
                    loss, stats = policy_loss(
                        logp, old, advantages[idx], mask[idx], clip_low=cfg.clip_low,
                        clip_high=cfg.clip_high, dual_clip=cfg.dual_clip, agg=cfg.agg,
                        ref_logp=None if ref_logp is None else ref_logp[idx], kl_coef=cfg.kl_coef,
                        kl_type=cfg.kl_type, entropy=ent, entropy_coef=cfg.entropy_coef,
                        # mini-batch-wide denominators: micro-batch losses add up to the mini-batch loss
                        num_tokens=num_tokens, num_seqs=len(mb),
                    )
                    self.manual_backward(loss)
                    micro_stats.append((_stats_dict(stats), len(idx) / len(mb)))
                if self.grad_clip > 0:
                    self.clip_gradients(opt, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")
                opt.step()
                per_step.append(combine_micro_stats(micro_stats))
        return {k: sum(d[k] for d in per_step) / len(per_step) for k in per_step[0]}

    def _global_token_count(self, mask: Tensor) -> float:
        """Tokens of this mini-batch over all ranks, divided by the world size.

        DDP averages gradients over ranks, so dividing each rank's token sum by (global tokens / world size)
        makes the averaged gradient the exact global token mean.
        """
        local = mask.sum().to(torch.float64)
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            local = self.trainer.strategy.reduce(local, reduce_op="sum")
        return max(float(local) / world, 1.0)

    # -------------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: FamilyBatch, prefix: str) -> None:
        assert self.policy is not None
        self.policy.eval()
        with torch.no_grad():
            roll = self._sample(self._encode(batch), self.val_sampling, self.val_sampling.num_samples,
                                stable_seed("eval", self.seed, prefix))
        answers = [batch.answers[i] for i in roll.prompt_index.tolist()]
        graded = self._grade(roll.texts, answers)
        acc = graded.accuracy.to(self.device, torch.float32)
        self.val_accuracy.update(acc)
        self.val_format.update(graded.format.to(self.device, torch.float32))
        levels = batch.level[roll.prompt_index.to(self.device)]
        for level in levels.unique().tolist():
            if 1 <= level <= MAX_LEVEL:
                self.val_level[level - 1].update(acc[levels == level])
                self._val_level_seen.add(level)

    def _log_eval(self, prefix: str) -> None:
        self.log(f"{prefix}/accuracy", self.val_accuracy.compute(), prog_bar=True, sync_dist=False)
        self.log(f"{prefix}/format", self.val_format.compute())
        for level in sorted(self._val_level_seen):
            self.log(f"{prefix}/accuracy_level{level}", self.val_level[level - 1].compute())
        self.val_accuracy.reset()
        self.val_format.reset()
        for metric in self.val_level:
            metric.reset()
        self._val_level_seen.clear()

    @override
    def validation_step(self, batch: FamilyBatch, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    @override
    def test_step(self, batch: FamilyBatch, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    @override
    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    # ------------------------------------------------------------------------------------------------ export
    def save_policy(self, out_dir: str | Path) -> Path:
        """Write the current policy in the standard `save_pretrained` layout (loadable by `load_policy`)."""
        assert self.bundle is not None
        return self.bundle.save(out_dir)


# Loss statistics that policy_loss aggregates with the mini-batch-wide denominator (num_tokens / num_seqs):
# the micro-batch values are shares of the mini-batch value and add up. Every other statistic is a
# per-micro-batch mean (weighted by the micro-batch's share of sequences) except the maximum ratio.
ADDITIVE_STATS = frozenset({"loss/policy", "kl", "entropy"})
MAX_STATS = frozenset({"ratio/max"})


def combine_micro_stats(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """One optimizer step's statistics from its micro-batches' (stats, share of the mini-batch) pairs."""
    out: dict[str, float] = {}
    for stats, share in parts:
        for key, value in stats.items():
            if key in MAX_STATS:
                out[key] = max(out.get(key, value), value)
            else:
                out[key] = out.get(key, 0.0) + (value if key in ADDITIVE_STATS else value * share)
    return out


def _stats_dict(stats: Any) -> dict[str, float]:
    """Flatten the loss stats container into loggable floats under TRL-style names."""
    raw = asdict(stats)
    names = {
        "pg_loss": "loss/policy", "clip_frac_low": "clip_ratio/low", "clip_frac_high": "clip_ratio/high",
        "dual_clip_frac": "clip_ratio/dual", "ratio_mean": "ratio/mean", "ratio_max": "ratio/max",
        "kl": "kl", "entropy": "entropy", "approx_kl": "approx_kl", "loss": "loss",
    }
    return {names.get(k, k): float(v) for k, v in raw.items() if v is not None}
