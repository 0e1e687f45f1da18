"""The HF teacher with the tiny policy: conversations rendered through the policy's encode, and the
accounting of a real (untrained, so mostly rejected) model's replies."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from diva_lightning.data.world import generate_world, render_tensor
from diva_lightning.teacher import AugmentSettings, HFTeacher, Request, augment_batch
from diva_lightning.teacher.augment import resolve_teacher
from diva_lightning.teacher.hf import _Chat


def test_conversations_render_with_images_only_where_sent(tiny_policy_dir: str) -> None:
    teacher = HFTeacher(tiny_policy_dir, max_new_tokens=4)
    bundle = teacher.bundle
    record = generate_world(1, seed=0, split="train")[0]
    image = render_tensor(record)
    two_turns = _Chat((("user", f"Solve {record.problem}"), ("assistant", "<step1>x</step1>"),
                       ("user", "The correct answer to this question is: 3")), send_images=True)
    prompt = bundle.build_prompt(two_turns)
    assert prompt.count("<|vision_start|><|image_pad|><|vision_end|>") == 1 and "<image>" not in prompt
    assert prompt.index("<|im_start|>user") < prompt.index("<|im_start|>assistant\n<step1>x</step1><|im_end|>")
    assert prompt.endswith("The correct answer to this question is: 3<|im_end|>\n<|im_start|>assistant\n")
    assert "You FIRST think" not in prompt  # the teacher's prompts replace the RL format instruction
    text_only = _Chat((("user", f"Reword: {record.problem}"),), send_images=False)
    assert "<image>" in bundle.build_prompt(text_only) and "<|image_pad|>" not in bundle.build_prompt(text_only)

    inputs = bundle.encode([two_turns, text_only], [[image], []])
    pads = (inputs["input_ids"] == bundle.image_token_id).sum(dim=1).tolist()
    assert pads[1] == 0 and pads[0] == int(inputs["image_grid_thw"].prod(dim=1).sum()) // 4  # merge 2 x 2


@pytest.mark.slow
def test_tiny_hf_teacher_end_to_end_accounting(tiny_policy_dir: str) -> None:
    records = [replace(r, think_steps=[]) for r in generate_world(2, seed=4, split="train")]
    images = [[render_tensor(r)] for r in records]
    teacher = HFTeacher(tiny_policy_dir, max_new_tokens=8, micro_batch_size=4)
    settings = AugmentSettings(k=2, verify_paraphrases=True)
    results = augment_batch(teacher, records, images, settings, seed=11)
    for record, res in zip(records, results):
        counts = res.counts()
        asked_variants = counts["variants"]["kept"] + sum(counts["variants"]["rejected"].values())
        assert asked_variants == 2 + counts["variants"]["rejected"].get("extra", 0)
        assert counts["think_steps"]["kept"] + sum(counts["think_steps"]["rejected"].values()) == 1
        out = res.augmented()
        if res.status(settings) == "none":  # an untrained model: its replies fail the checks
            assert out.variants == record.variants and out.think_steps == []
    # same seed, same batch: the same replies
    request = Request("paraphrase", (("user", "Reword: " + records[0].problem),), (), records[0], count=2)
    assert teacher.complete([request], seed=5) == teacher.complete([request], seed=5)


def test_a_checkpoint_path_means_the_hf_teacher(tiny_policy_dir: str) -> None:
    teacher = resolve_teacher(tiny_policy_dir)
    assert isinstance(teacher, HFTeacher) and teacher.teacher_id == tiny_policy_dir
    assert teacher.settings() == {"kind": "hf_generate", "temperature": 0.7, "top_p": 0.95, "max_new_tokens": 1024,
                                  "micro_batch_size": 8}
    assert isinstance(teacher.bundle.model.dtype, torch.dtype)
