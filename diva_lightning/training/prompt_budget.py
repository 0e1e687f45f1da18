"""Does every prompt fit the policy? Checked before the model loads (issue 10 item 3, issue 16 item 1).

A prompt's length is its chat-templated text in tokens with each ``<image>`` counted as the image tokens the
policy will see (one per merged patch at the configured pixel budget). A question is measured by the longest
prompt any of its variants can produce: each stored text (the problem and its paraphrases) with the longest hint
the planner can append, and with the rotation notice. The limit is ``max_prompt_length`` when set, and always the
policy's context length minus the response budget. Never a silent truncation: a too-long question is an error
that names its file, row and id, or (``prompt_overflow: skip``) dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from diva_lightning.core.tiers import VariantSpec
from diva_lightning.data.schema import QuestionRecord
from diva_lightning.data.variants import hint_step_count, render_variant
from diva_lightning.models.prompt import PromptConfig
from diva_lightning.models.vision import VisionSpec, smart_resize

MAX_HINT_STEPS = 3  # core.tiers.plan_variants' default: the most steps a hint reveals
LONGEST_ANGLE = 359.0  # the rotation notice's longest angle text


@dataclass(frozen=True)
class PromptMeasure:
    """Counts prompt tokens the way `PolicyBundle.encode` builds them, with the tokenizer alone (no model)."""

    tokenizer: Any
    prompt: PromptConfig
    vision: VisionSpec

    def image_tokens(self, height: int, width: int) -> int:
        factor = self.vision.patch_size * self.vision.merge_size
        h, w = smart_resize(height, width, factor=factor, min_pixels=self.vision.min_pixels,
                            max_pixels=self.vision.max_pixels)
        return (h // factor) * (w // factor)

    def length(self, text: str, image_sizes: list[tuple[int, int]]) -> int:
        """Tokens of one prompt: the templated text (each image placeholder one pad) plus the image tokens."""
        messages = []
        if self.prompt.system is not None:
            messages.append({"role": "system", "content": self.prompt.system})
        placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
        messages.append({"role": "user", "content": self.prompt.user_text(text).replace("<image>", placeholder)})
        templated = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(templated, add_special_tokens=False)["input_ids"]
        return len(ids) - len(image_sizes) + sum(self.image_tokens(h, w) for h, w in image_sizes)


def variant_texts(record: QuestionRecord, *, with_variants: bool) -> list[str]:
    """The texts whose prompts bound the record's longest prompt (the original alone without variants)."""
    bases = [record.problem, *record.variants] if with_variants else [record.problem]
    if not with_variants:
        return bases
    texts = list(bases)
    steps = hint_step_count(MAX_HINT_STEPS, len(record.think_steps))
    for k in range(len(bases)):
        index = None if k == 0 else k - 1
        if steps:
            hint = VariantSpec("hint", "hard", -1.0, hint_steps=steps, paraphrase_index=index)
            texts.append(render_variant(record, hint).prompt)
        if record.images:
            rotate = VariantSpec("image", "easy", 1.0, intensity=0.5, image_ops=("rotate",),
                                 rotation_deg=LONGEST_ANGLE, paraphrase_index=index)
            texts.append(render_variant(record, rotate).prompt)
    return texts


def longest_prompt(record: QuestionRecord, measure: PromptMeasure, image_sizes: list[tuple[int, int]], *,
                   with_variants: bool) -> int:
    return max(measure.length(t, image_sizes) for t in variant_texts(record, with_variants=with_variants))


def prompt_limit(*, context: int | None, max_new_tokens: int, max_prompt_length: int | None) -> int:
    """The longest prompt allowed: ``max_prompt_length`` if set, and never more than context - response budget."""
    limits = [] if max_prompt_length is None else [max_prompt_length]
    if context is not None:
        limits.append(context - max_new_tokens)
    if not limits:
        raise ValueError("set policy_config.max_prompt_length: the checkpoint states no context length")
    return min(limits)

