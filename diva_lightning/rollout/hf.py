"""Rollouts with HF ``generate``: batched, G samples per prompt, vision tokens suppressed."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping

import torch
from transformers import GenerationConfig

from diva_lightning.core.seeding import stable_seed
from diva_lightning.models.logprobs import encode_images, repeat_prompt_inputs
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.rollout.base import Rollout, RolloutEngine, mask_after_stop


class HFGenerateEngine(RolloutEngine):
    """``RolloutEngine`` on ``model.generate``.

    Every sampling setting is passed explicitly, so a checkpoint's ``generation_config`` (Qwen ships
    top_k=1, repetition_penalty=1.05) cannot silently change the sampling distribution that the
    PPO ratio assumes. Vision special tokens are suppressed: a sampled ``<|image_pad|>`` would make
    the re-scoring forward fail ("Image features and image tokens do not match").

    Args:
        seed_by_prompt: sample each prompt in its own ``generate`` call, seeded by the prompt's content, so a
            prompt's responses do not depend on which batch or rank it lands in (1 process with 2B questions
            samples what 2 processes with B each do). Slower (one call per prompt); for equivalence tests.
        return_old_logp: also fill ``Rollout.old_logp`` from generate's raw logits (log-softmax at the
            sampling temperature over the full vocabulary, i.e. the same quantity as
            ``completion_logprobs``, up to KV-cache numerics). Off by default: trainers usually re-score.
    """

    samples_from_module = True  # generates with the trained model itself: always the current weights

    def __init__(self, *, return_old_logp: bool = False, seed_by_prompt: bool = False) -> None:
        self.return_old_logp = return_old_logp
        self.seed_by_prompt = seed_by_prompt
        self.synced = False
        self.rank = 0

    def setup(self, bundle: PolicyBundle, *, rank: int, world_size: int, seed: int, sharded: bool) -> None:
        """Under FSDP every rank must run the same number of forwards (each one all-gathers the weights), so
        generation keeps stepping until every rank's responses have ended (``synced_gpus``)."""
        self.synced = sharded and world_size > 1
        self.rank = rank


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

        ``seed`` makes the draw reproducible without touching the caller's RNG stream (mixed with this process's
        rank, or with each prompt's fingerprint when ``seed_by_prompt``); ``None`` uses the global generator.
        """
        if num_generations < 1:
            raise ValueError("num_generations must be >= 1")
        gen_config = self.generation_config(
            bundle, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, do_sample=do_sample
        )
        num_prompts = inputs["input_ids"].shape[0]
        if not self.seed_by_prompt or seed is None:
            rows = torch.arange(num_prompts)
            return self._sample(bundle, inputs, rows, num_generations, gen_config,
                                None if seed is None else stable_seed(seed, self.rank))
        parts = [self._sample(bundle, inputs, torch.tensor([p]), num_generations, gen_config,
                              stable_seed(seed, _fingerprint(bundle, inputs, p)))
                 for p in range(num_prompts)]
        return Rollout.cat(parts, pad_id=int(bundle.tokenizer.pad_token_id))

    def _sample(self, bundle: PolicyBundle, inputs: Mapping[str, torch.Tensor], rows: torch.Tensor,
                num_generations: int, gen_config: GenerationConfig, seed: int | None) -> Rollout:
        """One ``generate`` call for prompt ``rows`` (G contiguous responses each).

        The prompts go in once each and ``generate`` expands them to G rows after encoding their images
        (``num_return_sequences``): each distinct image runs through the vision tower once, not G times. Under
        FSDP a call without any image runs the tower on a dummy image first, where an image batch encodes its
        images: every rank gathers the same units in the same order (text-only questions on one rank and image
        questions on another would otherwise issue different collectives and hang or abort).
        """
        model = bundle.model
        prompt_index = rows.repeat_interleave(num_generations)  # [N], groups contiguous
        batch = repeat_prompt_inputs(
            inputs, rows, image_token_id=bundle.image_token_id, merge_size=bundle.vision_spec.merge_size
        )
        batch = _strip_left_padding(batch)
        prompt_len = batch["input_ids"].shape[1]
        was_training = model.training
        model.eval()
        device = batch["input_ids"].device
        devices = [device] if device.type == "cuda" else []
        gen_config = copy.copy(gen_config)
        gen_config.num_return_sequences = num_generations
        try:
            if self.synced and "pixel_values" not in batch:
                encode_images(model, None, None, dummy=True)  # where an image batch runs the tower (see above)
            with torch.random.fork_rng(devices=devices, enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                out = model.generate(**batch, generation_config=gen_config, synced_gpus=self.synced)
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
            steps = out.logits[: completion_ids.shape[1]]  # one [N, V] per generated position
            logits = torch.stack(steps, dim=1).float()  # [N, T, V] raw (unprocessed) logits
            if gen_config.do_sample:
                logits = logits / gen_config.temperature
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


def _strip_left_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the columns that are padding in every row (a single prompt taken from a padded batch)."""
    used = batch["attention_mask"].bool().any(dim=0).nonzero()
    first = int(used[0]) if used.numel() else 0
    if first == 0:
        return batch
    return {k: (v[:, first:] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
            for k, v in batch.items()}


def _fingerprint(bundle: PolicyBundle, inputs: Mapping[str, torch.Tensor], row: int) -> str:
    """A digest of prompt ``row``'s tokens and pixels: the same prompt gets the same samples in any batch."""
    single = repeat_prompt_inputs(inputs, torch.tensor([row]), image_token_id=bundle.image_token_id,
                                  merge_size=bundle.vision_spec.merge_size)
    ids = single["input_ids"][single["attention_mask"].bool()]
    digest = hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=16)
    if "pixel_values" in single:
        digest.update(single["pixel_values"].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
