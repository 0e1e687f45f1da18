"""Scoring a round's responses under a model, and the PPO update's host (`training.ppo.UpdateHooks`).

- `RoundScorer`: log-probs of one round's responses under the policy, the reference or the old policy,
  micro-batched as the update forms them (padding-free packs or padded rows).
- `UpdateHost`: the `UpdateHooks` implementation on the LightningModule: scoring with gradient, manual backward, the
  clipped optimizer step (and the engine's weight sync), the global token denominator, the cross-rank maximum.
- `run_update`: old (where needed) and reference log-probs, then `PPOUpdate.run`; its statistics.

Staying on-policy (issue 11, issue 25): in a round of one optimizer step the old log-probs are the update forward's
own values, detached, whatever the engine (one that keeps its own weights is synced after every optimizer step, so it
sampled from these weights; how far its numerics differ is the correction's business, below); a round of several
optimizer steps re-scores them before the first update (logged: `rescored_old_logp`). When
the engine returns its own sampling log-probs, `rollout_correction` weighs each token by the trainer/engine ratio
(truncated or masked importance sampling) and logs the mismatch under `rollout_correction/`; the update computes
these weights from the old log-probs it has (`training.ppo.RoundCorrection`), so the correction adds no pass.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

from diva_lightning.core.loss import truncation_mask
from diva_lightning.core.seeding import stable_seed
from diva_lightning.models.attention import packs_in_one_row
from diva_lightning.models.logprobs import (
    StepImages,
    completion_logprobs,
    packed_logprobs,
    sequence_lengths,
    step_images,
)
from diva_lightning.models.lora import is_lora
from diva_lightning.rollout.base import Rollout
from diva_lightning.system.stages import TrainingSystem
from diva_lightning.training import sharding
from diva_lightning.training.ppo import UpdateBatch


def min_over_ranks(system: TrainingSystem, value: int) -> int:
    """The smallest ``value`` over ranks (the value itself on one process)."""
    if system.world_size == 1 or not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=system.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return int(t)


class RoundScorer:
    """Log-probs of one round's responses (``roll``, prompts encoded as ``inputs``) under a model."""

    def __init__(self, system: TrainingSystem, inputs: dict[str, Tensor], roll: Rollout) -> None:
        self.system, self.inputs, self.roll = system, inputs, roll

    def logprobs(self, model: torch.nn.Module, rows: list[int], *, entropy: bool = False,
                 images: StepImages | None = None) -> tuple[Tensor, Tensor | None]:
        """Log-probs [n, T] (and entropy [n, T] or None) of responses ``rows``."""
        s, roll, device = self.system, self.roll, self.system.device
        ids = roll.completion_ids.to(device)[rows]
        mask = roll.completion_mask.to(device)[rows]
        index = roll.prompt_index.to(device)[rows]
        temperature = max(s.train_sampling.temperature, 1e-5)
        if s.policy_cfg.padding_free:  # packed, each distinct image once, a dummy image keeps FSDP ranks in step
            # flash-attention's varlen kernels and sdpa_varlen attend within each sequence only: everything in one
            # row, no pad (sdpa / eager: rows of the longest sequence, their mask is dense across a row)
            one_row = packs_in_one_row(s.policy_cfg.attention())
            return packed_logprobs(model, self.inputs, ids, mask, prompt_index=index, temperature=temperature,
                                   with_entropy=entropy, sync_vision=s.sharded, images=images,
                                   pack_width=sys.maxsize if one_row else None,
                                   share_prompt=s.policy_cfg.shares_prompt())
        return completion_logprobs(model, self.inputs, ids, mask, prompt_index=index, temperature=temperature,
                                   with_entropy=entropy)

    def layout(self) -> dict[str, Tensor | None]:
        """Each response's real token count, prompt, and prompt length when prompts are shared
        (``UpdateBatch.seq_lens``, ``groups``, ``shared_prompt_lens``): what a token-budget micro-batch is formed
        from."""
        index = self.roll.prompt_index.to(self.system.device)
        mask = self.roll.completion_mask.to(self.system.device)
        shared = None
        if self.system.policy_cfg.shares_prompt():
            shared = self.inputs["attention_mask"].sum(dim=1).to(index.device)[index]
        return {"seq_lens": sequence_lengths(self.inputs, index, mask), "groups": index, "shared_prompt_lens": shared}

    @torch.no_grad()
    def all_logprobs(self, model: torch.nn.Module) -> Tensor:
        """Log-probs [N, T] of every response, without gradient, in the update's micro-batches."""
        s, roll = self.system, self.roll
        n = roll.num_responses
        if s.update.max_tokens is None:
            step = s.update.micro_batch_size or s.update.mini_batch_size or n
            parts = [list(range(start, min(start + step, n))) for start in range(0, n, step)]
        else:
            layout = UpdateBatch(advantages=torch.zeros(n), mask=roll.completion_mask.bool(), **self.layout())
            parts = s.update.micro_batches(list(range(n)), layout, UpdateHost(s, self))
        # no gradient: every distinct image of the step is encoded once for all micro-batches
        images = step_images(model, self.inputs, sync_vision=s.sharded) if s.policy_cfg.padding_free else None
        out = torch.zeros(roll.completion_ids.shape, dtype=torch.float32, device=s.device)
        for rows in parts:
            out[rows] = self.logprobs(model, rows, images=images)[0]
        return out

    def reference_logprobs(self) -> Tensor | None:
        """Under the reference policy (the base model with adapters off under LoRA); None without a KL term."""
        s = self.system
        if s.loss_cfg.kl_coef <= 0:
            return None
        if s.reference is not None:
            return self.all_logprobs(s.reference)
        assert s.policy is not None and is_lora(s.policy)
        with s.policy.disable_adapter():  # type: ignore[operator]
            return self.all_logprobs(s.policy)


class UpdateHost:
    """`training.ppo.UpdateHooks` on the LightningModule: scoring, manual backward, the optimizer step."""

    def __init__(self, system: TrainingSystem, scorer: RoundScorer) -> None:
        self.system, self.scorer = system, scorer
        self.grad_norms: list[float] = []  # before clipping, one per optimizer step taken or skipped

    def score(self, rows: list[int], *, entropy: bool) -> tuple[Tensor, Tensor | None]:
        assert self.system.policy is not None
        with torch.enable_grad():
            return self.scorer.logprobs(self.system.policy, rows, entropy=entropy)

    def backward(self, loss: Tensor) -> None:
        self.system.manual_backward(loss)

    def step(self) -> None:
        """Clip (on the model's gradients: correct for sharded DTensors and float32 masters alike), step, zero,
        and push the new weights to an engine that keeps its own copy."""
        s = self.system
        opt = s.optimizers()
        max_norm = s.grad_clip if s.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(s.trainable_parameters(), max_norm)
        norm = norm.full_tensor() if isinstance(norm, sharding.DTensor) else norm
        taken = bool(torch.isfinite(norm))
        if not taken:
            # skip the update, as the authors' dp_actor.py:163 (logged as skipped_steps): without gradients AdamW
            # leaves every parameter and its state as they are, and the step still counts for global_step
            opt.zero_grad(set_to_none=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if taken and not s.engine.samples_from_module:  # a skipped step changed no weight: nothing to push
            s.engine.sync_weights(s.policy)  # type: ignore[arg-type]
        self.grad_norms.append(float(norm))

    def token_denominator(self, mask: Tensor) -> float:
        """Tokens of this mini-batch over all ranks, divided by the world size.

        Data parallelism averages gradients over ranks, so dividing each rank's token sum by (global tokens /
        world size) makes the averaged gradient the exact global token mean.
        """
        local = mask.sum().to(torch.float64)
        world = self.system.world_size
        if world > 1:
            local = self.system.reduce_sum(local)
        return max(float(local) / world, 1.0)

    def max_over_ranks(self, value: int) -> int:
        return -min_over_ranks(self.system, -value)


def run_update(system: TrainingSystem, inputs: dict[str, Tensor], roll: Rollout, advantages: Tensor
               ) -> dict[str, float]:
    """Old (where needed) and reference log-probs, then the PPO update (with the rollout correction's weights);
    returns its statistics."""
    s = system
    assert s.policy is not None
    n = advantages.numel()
    mask = roll.completion_mask.to(s.device).bool()
    if s.loss_cfg.mask_truncated_completions and roll.finished is not None:
        mask = truncation_mask(mask, roll.finished.to(s.device))
    scorer = RoundScorer(s, inputs, roll)
    # A round of one optimizer step meets the weights it was sampled with: the module itself, or an engine with its
    # own copy (vLLM), which is synced after every optimizer step. The old log-probs are then the update forward's
    # own values, detached, and a separate pass would compute the same numbers again (issue 25 item 5); the rollout
    # correction's weights are computed from them too, micro-batch by micro-batch (`training.ppo.RoundCorrection`).
    # The pass stays where it is needed: several optimizer steps per round.
    old_logp = None if s.update.single_step(n) else scorer.all_logprobs(s.policy)
    stats: dict[str, float] = {"rescored_old_logp": float(old_logp is not None)}
    engine_logp = None if s.correction is None or roll.old_logp is None else roll.old_logp.to(s.device)
    batch = UpdateBatch(advantages=advantages, mask=mask, old_logp=old_logp, ref_logp=scorer.reference_logprobs(),
                        engine_logp=engine_logp, correction=None if engine_logp is None else s.correction,
                        **scorer.layout())
    g = torch.Generator().manual_seed(stable_seed("minibatch", s.seed, s.global_step, s.global_rank))
    host = UpdateHost(s, scorer)
    stats.update(s.update.run(batch, host, generator=g))
    finite = [x for x in host.grad_norms if math.isfinite(x)]
    stats["grad_norm"] = sum(finite) / len(finite) if finite else math.nan  # before clipping, of the steps taken
    stats["skipped_steps"] = float(len(host.grad_norms) - len(finite))  # non-finite norm: step skipped
    return stats
