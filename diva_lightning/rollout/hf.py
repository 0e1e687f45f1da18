"""Rollouts with HF ``generate``: batched, G samples per prompt, vision tokens suppressed."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import GenerationConfig

from diva_lightning.models.logprobs import repeat_prompt_inputs
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.rollout.base import Rollout, mask_after_stop


class HFGenerateEngine:
    """``RolloutEngine`` on ``model.generate``.

    Every sampling setting is passed explicitly, so a checkpoint's ``generation_config`` (Qwen ships
    top_k=1, repetition_penalty=1.05) cannot silently change the sampling distribution that the
    PPO ratio assumes. Vision special tokens are suppressed: a sampled ``<|image_pad|>`` would make
    the re-scoring forward fail ("Image features and image tokens do not match").

    Args:
        return_old_logp: also fill ``Rollout.old_logp`` from generate's raw logits (log-softmax at the
            sampling temperature over the full vocabulary, i.e. the same quantity as
            ``completion_logprobs``, up to KV-cache numerics). Off by default: trainers usually re-score.
    """

    def __init__(self, *, return_old_logp: bool = False) -> None:
        self.return_old_logp = return_old_logp

    def generation_config(
        self, bundle: PolicyBundle, *, temperature: float, top_p: float, max_new_tokens: int, do_sample: bool
    ) -> GenerationConfig:
        """The explicit ``GenerationConfig`` used for sampling (neutral everywhere except the arguments)."""
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        sampling = {"temperature": temperature, "top_p": top_p, "top_k": 0, "min_p": 0.0} if do_sample else {}
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            repetition_penalty=1.0,
            eos_token_id=bundle.stop_token_ids,
            pad_token_id=int(bundle.tokenizer.pad_token_id),
            suppress_tokens=bundle.vision_token_ids,
            num_beams=1,
            return_dict_in_generate=True,
            output_logits=self.return_old_logp,
            **sampling,
        )

    @torch.no_grad()
    def generate(
        self,
        bundle: PolicyBundle,
        inputs: Mapping[str, torch.Tensor],
        *,
        num_generations: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 256,
        do_sample: bool = True,
        seed: int | None = None,
    ) -> Rollout:
        """Sample ``num_generations`` responses per prompt row of ``inputs`` (``PolicyBundle.encode`` output).

        ``seed`` makes the draw reproducible without touching the caller's RNG stream; ``None`` uses the
        global generator (seeded by Lightning's ``seed_everything``).
        """
        if num_generations < 1:
            raise ValueError("num_generations must be >= 1")
        model = bundle.model
        num_prompts = inputs["input_ids"].shape[0]
        prompt_index = torch.arange(num_prompts).repeat_interleave(num_generations)  # [N], groups contiguous
        batch = repeat_prompt_inputs(
            inputs,
            prompt_index,
            image_token_id=bundle.image_token_id,
            merge_size=bundle.vision_spec.merge_size,
        )
        gen_config = self.generation_config(
            bundle, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, do_sample=do_sample
        )
        prompt_len = batch["input_ids"].shape[1]
        was_training = model.training
        model.eval()
        device = batch["input_ids"].device
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                out = model.generate(**batch, generation_config=gen_config)
        finally:
            model.train(was_training)
        completion_ids = out.sequences[:, prompt_len:]
        completion_mask, finished = mask_after_stop(completion_ids, bundle.stop_token_ids)
        # texts: the real tokens minus the stop token itself
        stop = torch.tensor(bundle.stop_token_ids, device=completion_ids.device)
        keep = completion_mask.bool() & ~torch.isin(completion_ids, stop)
        texts = [
            bundle.tokenizer.decode(ids[k].tolist(), skip_special_tokens=True)
            for ids, k in zip(completion_ids, keep)
        ]
        old_logp = None
        if self.return_old_logp:
            logits = torch.stack(out.logits, dim=1).float()  # [N, T, V] raw (unprocessed) logits
            if do_sample:
                logits = logits / temperature
            old_logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
            old_logp = old_logp * completion_mask
        return Rollout(
            prompt_index=prompt_index.to(device),
            completion_ids=completion_ids,
            completion_mask=completion_mask,
            texts=texts,
            old_logp=old_logp,
            finished=finished,
        )
