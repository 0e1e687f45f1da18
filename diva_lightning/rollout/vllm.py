"""Rollouts with vLLM (optional extra, CUDA only), colocated in each training process (TRL's "colocate" mode).

UNTESTED END TO END: vLLM's wheels are CUDA-only and cannot be installed on the machines this was built on. The
pure parts are tested on CPU: prompt building (:meth:`VLLMEngine.prompts`), parameter-name mapping
(:func:`vllm_weight_name`) and the weight iterator over a sharded module (:func:`vllm_weights`).

The contract (``rollout.base.RolloutEngine``), and how this engine keeps it:

- ``samples_from_module = False``: vLLM holds its own copy of the weights, so the trainer re-scores old
  log-probs; the engine returns its own sampling log-probs ("processed": after temperature, as the trainer
  scores them) for the importance-sampling correction (``rollout_correction`` in the system).
- ``setup`` creates the ``vllm.LLM`` lazily in each process, when ranks and devices exist: in-process
  (``distributed_executor_backend="external_launcher"`` under torchrun/Lightning with several processes), seeded
  per rank, with sleep mode so the trainer gets the memory back during the update.
- ``sync_weights`` (after every optimizer step) marks the weights stale; ``wake`` (after the round's update)
  pushes them once: every parameter gathered as a full tensor from its FSDP shards (one at a time), LoRA merged,
  names mapped to the original Qwen2.5-VL checkpoint's (which every vLLM version loads).
- Images are handed over at the pixels the trainer scores (un-patchified from the encoded batch, already a
  multiple of the patch grid, and vLLM's processor is given the same pixel budget); vision tokens are never
  sampled (logit bias), as with HF ``generate``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from diva_lightning.models.logprobs import images_per_row
from diva_lightning.models.lora import is_lora, lora_scale, merge_lora_state_dict
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.models.vision import unpatchify_images
from diva_lightning.rollout.base import Rollout, RolloutEngine, mask_after_stop
from diva_lightning.training.sharding import full_state_dict, iter_full_tensors

_INSTALL_HINT = ("VLLMEngine needs vLLM, which is CUDA-only: pip install 'diva-lightning[vllm]' on a CUDA machine, "
                 "or use diva_lightning.rollout.hf.HFGenerateEngine")
# transformers >= 5 names -> the original Qwen2(.5)-VL checkpoint names (vLLM's loaders read the latter).
_NAME_RULES = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))


def vllm_weight_name(name: str) -> str:
    """A trained policy's parameter name as the original Qwen2.5-VL checkpoint (and vLLM's loader) spells it."""
    for pattern, replacement in _NAME_RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def vllm_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, full tensor) for every weight of ``model``, LoRA merged.

    Collective under FSDP: every rank must consume the whole iterator (each full tensor is an all-gather).
    Without LoRA one full parameter is alive at a time; with LoRA the merged state dict is gathered once.
    """
    if is_lora(model):
        state = merge_lora_state_dict(full_state_dict(model), scale=lora_scale(model))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # full_state_dict gives rank 0 the tensors; every rank's engine needs them
            holder = [state]
            torch.distributed.broadcast_object_list(holder, src=0)
            state = holder[0]
        yield from ((vllm_weight_name(k), v) for k, v in state.items())
        return
    for name, tensor in iter_full_tensors(model):
        yield vllm_weight_name(name), tensor


class VLLMEngine(RolloutEngine):
    """``RolloutEngine`` on a ``vllm.LLM`` colocated in each training process.

    Args:
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer needs the rest).
        max_images_per_prompt: vLLM's ``limit_mm_per_prompt`` for images.
        sleep_mode: free vLLM's memory (level 1: KV cache freed, weights offloaded) during the update.
        max_model_len: vLLM's context (prompt + response); null: the checkpoint's.
        llm_kwargs: more ``vllm.LLM`` arguments (e.g. ``{"enforce_eager": true}``).
    """

    samples_from_module = False

    def __init__(self, *, gpu_memory_utilization: float = 0.4, max_images_per_prompt: int = 4,
                 sleep_mode: bool = True, max_model_len: int | None = None,
                 llm_kwargs: dict[str, Any] | None = None) -> None:
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
        self.gpu_memory_utilization = gpu_memory_utilization
        self.max_images_per_prompt = max_images_per_prompt
        self.sleep_mode = sleep_mode
        self.max_model_len = max_model_len
        self.llm_kwargs = dict(llm_kwargs or {})
        self.llm: Any = None
        self.rank = 0
        self._stale: torch.nn.Module | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def llm_arguments(self, bundle: PolicyBundle, *, world_size: int, seed: int) -> dict[str, Any]:
        """The ``vllm.LLM`` arguments for this process (pure: tested without vLLM)."""
        if bundle.source is None:
            raise ValueError("VLLMEngine needs the policy's checkpoint path (load it with load_policy)")
        args: dict[str, Any] = {
            "model": bundle.source,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "limit_mm_per_prompt": {"image": self.max_images_per_prompt},
            "mm_processor_kwargs": {"min_pixels": bundle.vision_spec.min_pixels,
                                    "max_pixels": bundle.vision_spec.max_pixels},
            "enable_sleep_mode": self.sleep_mode,
            "logprobs_mode": "processed_logprobs",  # after temperature: what the trainer scores
            "seed": seed,
            "dtype": str(next(bundle.model.parameters()).dtype).removeprefix("torch."),
        }
        if world_size > 1:
            args["distributed_executor_backend"] = "external_launcher"  # one in-process engine per rank
        if self.max_model_len is not None:
            args["max_model_len"] = self.max_model_len
        return {**args, **self.llm_kwargs}

    def setup(self, bundle: PolicyBundle, *, rank: int, world_size: int, seed: int, sharded: bool) -> None:
        try:
            import vllm  # lazy: optional extra
        except ImportError as err:
            raise ImportError(_INSTALL_HINT) from err
        if self.llm is None:
            self.llm = vllm.LLM(**self.llm_arguments(bundle, world_size=world_size, seed=seed))
        self.rank = rank

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Mark the weights stale; they are pushed once in :meth:`wake`, after the round's last step."""
        self._stale = model

    def sleep(self) -> None:
        if self.llm is not None and self.sleep_mode:
            self.llm.sleep(level=1)

    def wake(self) -> None:
        if self.llm is None:
            return
        if self.sleep_mode:
            self.llm.wake_up()
        if self._stale is not None:
            worker_model = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
            worker_model.load_weights(weights=vllm_weights(self._stale))
            self.llm.reset_prefix_cache()
            self._stale = None

    # ----------------------------------------------------------------------------------------- generation
    def prompts(self, bundle: PolicyBundle, inputs: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        """vLLM prompts from an encoded batch: left padding stripped, each run of ``<|image_pad|>`` collapsed to
        one (vLLM expands it again), and the images un-patchified at the pixels the trainer scores."""
        from PIL import Image

        images: list[torch.Tensor] = []
        if "pixel_values" in inputs:
            images = unpatchify_images(inputs["pixel_values"], inputs["image_grid_thw"], bundle.vision_spec)
        n_img = images_per_row(
            inputs, image_token_id=bundle.image_token_id, merge_size=bundle.vision_spec.merge_size
        ).tolist()
        prompts: list[dict[str, Any]] = []
        k = 0
        for row, mask, count in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), n_img):
            ids = [t for t, a in zip(row, mask) if a]
            collapsed = [t for i, t in enumerate(ids)
                         if not (t == bundle.image_token_id and i > 0 and ids[i - 1] == bundle.image_token_id)]
            prompt: dict[str, Any] = {"prompt_token_ids": collapsed}
            if count:
                pil = [Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
                       for img in images[k : k + count]]
                prompt["multi_modal_data"] = {"image": pil}
                k += count
            prompts.append(prompt)
        return prompts

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
        """Same contract as ``HFGenerateEngine.generate``, plus the engine's own sampling log-probs."""
        if self.llm is None:
            raise RuntimeError("VLLMEngine.generate before setup: the system calls setup once ranks exist")
        import vllm

        params = vllm.SamplingParams(
            n=num_generations,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0,
            top_k=-1,
            max_tokens=max_new_tokens,
            seed=None if seed is None else (seed + self.rank) % (1 << 31),
            stop_token_ids=bundle.stop_token_ids,
            logit_bias={tid: -100.0 for tid in bundle.vision_token_ids},  # never sample vision tokens
            skip_special_tokens=True,
            logprobs=0,  # the sampled token's log-prob
        )
        outputs = self.llm.generate(self.prompts(bundle, inputs), params, use_tqdm=False)
        completions = [(p, c) for p, out in enumerate(outputs) for c in out.outputs]
        return rollout_from_completions(bundle, completions, device=inputs["input_ids"].device)


def rollout_from_completions(bundle: PolicyBundle, completions: list[tuple[int, Any]], *,
                             device: torch.device) -> Rollout:
    """A `Rollout` from (prompt row, vLLM CompletionOutput) pairs (pure: tested with stand-in outputs)."""
    seqs = [list(c.token_ids) for _, c in completions]
    width = max(1, max(len(s) for s in seqs))
    pad = int(bundle.tokenizer.pad_token_id)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    logp = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, ((_, c), s) in enumerate(zip(completions, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        if c.logprobs is not None:
            logp[i, : len(s)] = torch.tensor([float(step[t].logprob) for step, t in zip(c.logprobs, s)])
    mask, _ = mask_after_stop(ids, bundle.stop_token_ids)
    # rows shorter than ``width`` are padding (the pad id is itself a stop id, so judge by length)
    lengths = torch.tensor([len(s) for s in seqs])
    mask = mask * (torch.arange(width)[None] < lengths[:, None]).long()
    stops = set(bundle.stop_token_ids)
    finished = torch.tensor([bool(s) and s[-1] in stops for s in seqs])
    has_logp = all(c.logprobs is not None for _, c in completions)
    return Rollout(
        prompt_index=torch.tensor([p for p, _ in completions], device=device),
        completion_ids=ids.to(device),
        completion_mask=mask.to(device),
        texts=[c.text for _, c in completions],
        old_logp=(logp * mask).to(device) if has_logp else None,
        finished=finished.to(device),
    )
