"""A callback for the vLLM CLI tests: which weights does the engine sample from right now?

At the end of validation (and at the start of the first training batch) it samples a few responses through the
module's own engine and scores them with the module's own policy (``completion_logprobs``, what the trainer uses);
the largest per-token gap is appended to a JSON-lines file. A gap at float32 noise means the engine holds the
module's weights (a restored checkpoint's, after ``--ckpt_path``); an engine still on the base checkpoint's
weights gives a gap of order 1 once the weights have moved.
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import torch

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.logprobs import completion_logprobs


class EngineProbe(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = out
        self.probed_fit = False

    @torch.no_grad()
    def probe(self, module: Any, stage: str) -> None:
        bundle = module.bundle
        records = [r for r in generate_world(8, seed=3, split="val") if r.images][:2]
        inputs = bundle.encode([r.problem for r in records], [[decode_image(r.images[0])] for r in records])
        inputs = {k: v.to(module.device) for k, v in inputs.items()}
        roll = module.engine.generate(bundle, inputs, num_generations=2, temperature=1.0, max_new_tokens=8, seed=1)
        was_training = module.policy.training
        module.policy.eval()
        logp, _ = completion_logprobs(module.policy, inputs, roll.completion_ids, roll.completion_mask,
                                      prompt_index=roll.prompt_index)
        module.policy.train(was_training)
        mask = roll.completion_mask.float()
        gap = float(((logp - roll.old_logp) * mask).abs().max())
        with open(self.out, "a") as f:
            f.write(json.dumps({"stage": stage, "rank": module.global_rank, "step": module.global_step,
                                "gap": gap}) + "\n")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit":
            self.probe(pl_module, "validate")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self.probed_fit:
            self.probed_fit = True
            self.probe(pl_module, "fit")
