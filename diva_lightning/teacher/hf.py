"""The HF ``generate`` teacher: any local Qwen2.5-VL-style checkpoint, batched, on CPU or GPU.

The checkpoint is read by the policy's own loader (``models.policy.load_policy``) with no format
instruction (the teacher prompts say what to write), and requests are encoded by the policy's own
``PolicyBundle.encode``, so images get exactly the policy's handling (resize to the pixel budget,
patches, one ``<|image_pad|>`` per merged patch, left padding). Sampling is ``rollout.hf.HFGenerateEngine``
with every setting explicit (a checkpoint's ``generation_config`` cannot change it).

``encode`` takes one problem string per row and renders a single user turn; a teacher request is a
conversation (turn 2 of the think steps carries turn 1's reply) and may be text only (paraphrases: the
``<image>`` tags are literal text to copy, no image is sent). :class:`_ChatBundle` overrides only
``build_prompt`` to render a whole :class:`_Chat`; a ``_Chat`` is a ``str`` whose value is its user text
with the tags of unsent images masked, which is what ``encode`` counts ``<image>`` tags in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diva_lightning.models.policy import IMAGE_PLACEHOLDER, VISION_PLACEHOLDER, PolicyBundle, load_policy
from diva_lightning.models.prompt import PromptConfig
from diva_lightning.rollout.hf import HFGenerateEngine
from diva_lightning.teacher.base import Request, Role, Teacher

_MASKED_TAG = "[image]"


class _Chat(str):
    """A request's conversation; its string value is for ``encode``'s tag count (see the module docstring)."""

    turns: tuple[tuple[Role, str], ...]
    send_images: bool

    def __new__(cls, turns: tuple[tuple[Role, str], ...], send_images: bool) -> _Chat:
        user = " ".join(text for role, text in turns if role == "user")
        self = super().__new__(cls, user if send_images else user.replace(IMAGE_PLACEHOLDER, _MASKED_TAG))
        self.turns, self.send_images = turns, send_images
        return self


class _ChatBundle(PolicyBundle):
    """A ``PolicyBundle`` whose ``build_prompt`` renders whole conversations (``encode`` is inherited)."""

    def build_prompt(self, problem: str) -> str:
        if not isinstance(problem, _Chat):
            return super().build_prompt(problem)
        messages: list[dict[str, str]] = []
        if self.prompt.system is not None:
            messages.append({"role": "system", "content": self.prompt.system})
        for role, text in problem.turns:
            if role == "user" and problem.send_images:
                text = text.replace(IMAGE_PLACEHOLDER, VISION_PLACEHOLDER)
            messages.append({"role": role, "content": text})
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


class HFTeacher(Teacher):
    """A local vision-language checkpoint sampled with HF ``generate``.

    Args:
        model: checkpoint directory (tiny or real Qwen2.5-VL) or hub id, as ``load_policy`` takes it.
        temperature: sampling temperature (0 = greedy).
        top_p: nucleus sampling mass.
        max_new_tokens: reply length cap; a reply cut off here usually fails parsing and is counted so.
        micro_batch_size: requests per ``generate`` call (memory bound).
        dtype: weights dtype name (``bfloat16`` on GPU); None: transformers' default.
        device: ``cuda``, ``cpu``...; None: CPU.
        system: system prompt; None keeps the chat template's default.
    """

    def __init__(self, model: str, *, temperature: float = 0.7, top_p: float = 0.95, max_new_tokens: int = 1024,
                 micro_batch_size: int = 8, dtype: str | None = None, device: str | None = None,
                 system: str | None = None) -> None:
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or micro_batch_size < 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1, micro_batch_size >= 1")
        self.model = model
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.micro_batch_size = micro_batch_size
        loaded = load_policy(model, dtype=dtype, device=device, prompt=PromptConfig(instruction=None, system=system))
        self.bundle = _ChatBundle(model=loaded.model, tokenizer=loaded.tokenizer,
                                  image_processor=loaded.image_processor, prompt=loaded.prompt)
        self.engine = HFGenerateEngine()

    @property
    def teacher_id(self) -> str:
        return self.model

    def settings(self) -> dict[str, Any]:
        return {"kind": "hf_generate", "temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "micro_batch_size": self.micro_batch_size}

    def complete(self, requests: Sequence[Request], *, seed: int) -> list[str]:
        replies: list[str] = []
        for start in range(0, len(requests), self.micro_batch_size):
            chunk = requests[start:start + self.micro_batch_size]
            chats = [_Chat(r.turns, send_images=bool(r.images)) for r in chunk]
            images: list[list[torch.Tensor]] = [list(r.images) for r in chunk]
            inputs = self.bundle.encode(chats, images)
            rollout = self.engine.generate(
                self.bundle, inputs, num_generations=1, temperature=self.temperature or 1.0, top_p=self.top_p,
                max_new_tokens=self.max_new_tokens, do_sample=self.temperature > 0, seed=seed + start)
            replies.extend(rollout.texts)
        return replies
