"""The vLLM teacher (GPU, the ``vllm`` optional extra). Only :func:`chat_messages` is tested here: vLLM
cannot be installed on the CPU stack.

Written against vLLM's documented offline chat API: ``LLM.chat(conversations, sampling_params)`` with
OpenAI-style messages, images as ``image_url`` parts holding PNG data URLs, one ``SamplingParams`` per
conversation (each with its own seed, so a reply does not depend on the other requests in the batch).
vLLM's own processor handles the images (its resize may differ slightly from the HF teacher's).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from diva_lightning.teacher.base import Request, Teacher

IMAGE_TAG = "<image>"
_INSTALL_HINT = ("VLLMTeacher needs vLLM, which is not installed: pip install 'diva-lightning[vllm]' on a CUDA "
                 "machine, or use --teacher diva_lightning.teacher.HFTeacher (HF generate, CPU or GPU)")


def png_data_url(image: torch.Tensor) -> str:
    """A ``[3, H, W]`` float image in [0, 1] as a ``data:image/png;base64,...`` URL (lossless)."""
    pixels = image.detach().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous().cpu()
    out = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def chat_messages(request: Request, system: str | None = None) -> list[dict[str, Any]]:
    """The request as OpenAI-style chat messages.

    With images, each user turn that holds ``<image>`` tags is split at them into text and ``image_url`` parts
    (the k-th tag of the conversation gets ``request.images[k]``); other turns are plain strings, and
    text-only requests keep their tags as text.
    """
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    images = iter(request.images)
    for role, text in request.turns:
        if role != "user" or not request.images or IMAGE_TAG not in text:
            messages.append({"role": role, "content": text})
            continue
        pieces = text.split(IMAGE_TAG)
        parts: list[dict[str, Any]] = []
        for k, piece in enumerate(pieces):
            if k > 0:
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(next(images))}})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": role, "content": parts})
    return messages


class VLLMTeacher(Teacher):
    """A checkpoint served by an in-process ``vllm.LLM``.

    Args:
        model: checkpoint path or hub id.
        temperature, top_p, max_new_tokens: sampling (as :class:`~diva_lightning.teacher.hf.HFTeacher`).
        system: system prompt; None keeps the chat template's default.
        gpu_memory_utilization: fraction of GPU memory vLLM may take.
        max_images_per_prompt: vLLM's ``limit_mm_per_prompt`` for images.
        llm_kwargs: passed on to ``vllm.LLM`` (``tensor_parallel_size``, ``dtype``, ``max_model_len``...).
    """

    def __init__(self, model: str, *, temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 1024,
                 system: str | None = None, gpu_memory_utilization: float = 0.9, max_images_per_prompt: int = 4,
                 llm_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import vllm  # lazy: optional extra
        except ImportError as err:
            raise ImportError(_INSTALL_HINT) from err
        self._vllm = vllm
        self.model, self.system = model, system
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.llm = vllm.LLM(model=model, gpu_memory_utilization=gpu_memory_utilization,
                            limit_mm_per_prompt={"image": max_images_per_prompt}, **(llm_kwargs or {}))

    @property
    def teacher_id(self) -> str:
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"kind": "vllm", "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens}

    def complete(self, requests: Sequence[Request], *, seed: int) -> list[str]:
        params = [self._vllm.SamplingParams(n=1, temperature=self.temperature, top_p=self.top_p,
                                            max_tokens=self.max_new_tokens, seed=seed + i)
                  for i in range(len(requests))]
        outputs = self.llm.chat([chat_messages(r, self.system) for r in requests], sampling_params=params,
                                use_tqdm=False)
        return [out.outputs[0].text for out in outputs]
