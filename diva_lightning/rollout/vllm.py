"""Rollouts with vLLM (optional extra, CUDA only). UNTESTED here: vLLM cannot be installed on the CPU stack.

Written against vLLM's documented offline API (``LLM.generate`` with ``{"prompt_token_ids": ...,
"multi_modal_data": {"image": [...]}}`` prompts and ``SamplingParams``). The encoded batch is turned
back into what vLLM takes: left padding stripped, each run of ``<|image_pad|>`` collapsed to one pad
(vLLM expands it again with its own processor), and the preprocessed pixels un-patchified into
images whose size already fits the patch grid (so vLLM's processor does not resize them and the
token counts agree with the HF path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from diva_lightning.models.logprobs import images_per_row
from diva_lightning.models.policy import PolicyBundle
from diva_lightning.models.vision import unpatchify_images
from diva_lightning.rollout.base import Rollout, RolloutEngine, mask_after_stop

_INSTALL_HINT = "VLLMEngine needs vLLM: pip install diva-lightning[vllm] on a CUDA machine"


class VLLMEngine(RolloutEngine):
    """``RolloutEngine`` on a colocated ``vllm.LLM``.

    Args:
        model: checkpoint path or hub id (the same one ``load_policy`` read).
        gpu_memory_utilization: fraction of GPU memory vLLM may take (the trainer needs the rest).
        max_images_per_prompt: vLLM's ``limit_mm_per_prompt`` for images.
        llm_kwargs: passed on to ``vllm.LLM`` (e.g. ``tensor_parallel_size``, ``dtype``, ``max_model_len``).

    Call :meth:`sync_weights` after each optimizer step so rollouts come from the current policy.
    """

    def __init__(
        self,
        model: str,
        *,
        gpu_memory_utilization: float = 0.4,
        max_images_per_prompt: int = 4,
        **llm_kwargs: Any,
    ) -> None:
        try:
            import vllm  # lazy: optional extra
        except ImportError as err:
            raise ImportError(_INSTALL_HINT) from err
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model,
            gpu_memory_utilization=gpu_memory_utilization,
            limit_mm_per_prompt={"image": max_images_per_prompt},
            **llm_kwargs,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the trained policy's weights into the vLLM model (single-process colocated setup)."""
        state = model.state_dict()
        # vLLM >= 0.8 V1 engine: run load_weights on every worker; the model name mapping from HF
        # parameter names is handled by vLLM's Qwen2.5-VL ``load_weights``.
        self.llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(state.items()))
        self.llm.reset_prefix_cache()

    def _prompts(self, bundle: PolicyBundle, inputs: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
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
            collapsed = [
                t
                for i, t in enumerate(ids)
                if not (t == bundle.image_token_id and i > 0 and ids[i - 1] == bundle.image_token_id)
            ]
            prompt: dict[str, Any] = {"prompt_token_ids": collapsed}
            if count:
                pil = [
                    Image.fromarray((img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
                    for img in images[k : k + count]
                ]
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
        """Same contract as ``HFGenerateEngine.generate``; ``old_logp`` is left to the trainer to re-score
        (vLLM's default logprobs are of the raw, untempered logits)."""
        params = self._vllm.SamplingParams(
            n=num_generations,
            temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0,
            top_k=-1,
            max_tokens=max_new_tokens,
            seed=seed,
            stop_token_ids=bundle.stop_token_ids,
            logit_bias={tid: -100.0 for tid in bundle.vision_token_ids},  # never sample vision tokens
            skip_special_tokens=True,
        )
        outputs = self.llm.generate(self._prompts(bundle, inputs), params, use_tqdm=False)
        seqs: list[list[int]] = []
        index: list[int] = []
        for p, out in enumerate(outputs):
            for completion in out.outputs:
                seqs.append(list(completion.token_ids))
                index.append(p)
        width = max(1, max(len(s) for s in seqs))
        device = inputs["input_ids"].device
        pad = int(bundle.tokenizer.pad_token_id)
        completion_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        for i, s in enumerate(seqs):
            completion_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        completion_ids = completion_ids.to(device)
        mask, _ = mask_after_stop(completion_ids, bundle.stop_token_ids)
        # rows shorter than ``width`` are padding (the pad id is itself a stop id, so judge by length)
        stops = set(bundle.stop_token_ids)
        finished = torch.tensor([bool(s) and s[-1] in stops for s in seqs], device=device)
        lengths = torch.tensor([len(s) for s in seqs], device=device)
        mask = mask * (torch.arange(width, device=device)[None] < lengths[:, None]).long()
        texts = [completion.text for out in outputs for completion in out.outputs]
        return Rollout(
            prompt_index=torch.tensor(index, device=device),
            completion_ids=completion_ids,
            completion_mask=mask,
            texts=texts,
            finished=finished,
        )
