"""Test policies with a known behaviour, trained here in seconds from the tiny policy (no mocks of the model)."""

from __future__ import annotations

from pathlib import Path

import torch

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.policy import load_policy
from diva_lightning.system.warmup import SFTModule

ALWAYS_B = "<think>B</think> \\boxed{B}"


def train_constant_policy(base_dir: str | Path, out_dir: str | Path, response: str = ALWAYS_B, steps: int = 30,
                          seed: int = 0) -> Path:
    """The tiny policy at ``base_dir`` taught by teacher forcing to answer ``response`` to any prompt (world
    questions with their images, under the R1 instruction); saved at ``out_dir``. Greedy decoding then gives
    ``response`` on unseen prompts too (benchmark questions), so scores can be worked out by hand."""
    torch.manual_seed(seed)
    sft = SFTModule()
    sft.bundle = bundle = load_policy(str(base_dir))
    sft.policy = bundle.model.train()
    records = generate_world(16, seed=seed, split="train")
    problems = [r.problem for r in records]  # encode adds the instruction
    images = [decode_image(r.images[0], None) for r in records]
    opt = torch.optim.AdamW(sft.policy.parameters(), lr=3e-3)
    for step in range(steps):
        batch = slice(4 * (step % 4), 4 * (step % 4) + 4)
        loss, _ = sft.sft_loss(problems[batch], [response] * 4, images[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    bundle.model.eval()
    bundle.save(str(out_dir))
    return Path(out_dir)
