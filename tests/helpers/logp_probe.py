"""A callback that scores fixed completions with the live (possibly sharded) policy at the end of `fit`.

Rank 0 saves {"logp": [N, T], "vllm_weights": {name: tensor}} to `out`; the latter is what a vLLM engine would
be sent (full tensors gathered from the shards, checkpoint names). Every rank takes part (the forward
all-gathers FSDP shards). The inputs are the first world validation questions with fixed completion tokens, so a
test can score the same inputs with the exported policy and compare.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from diva_lightning.data.schema import decode_image
from diva_lightning.data.world import generate_world
from diva_lightning.models.logprobs import completion_logprobs
from diva_lightning.rollout.vllm import vllm_weights


def probe_inputs(bundle: Any, n: int = 3) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    records = generate_world(n, seed=0, split="val")
    inputs = bundle.encode([r.problem for r in records], [[decode_image(r.images[0])] for r in records])
    tok = bundle.tokenizer
    ids = [tok(f"<think> {r.think_steps[0]} </think> \\boxed{{{r.answer}}}", add_special_tokens=False)["input_ids"]
           for r in records]
    width = max(len(i) for i in ids)
    completion = torch.full((n, width), int(tok.pad_token_id), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for k, row in enumerate(ids):
        completion[k, : len(row)] = torch.tensor(row)
        mask[k, : len(row)] = 1
    return inputs, completion, mask


class LogpProbe(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        bundle = pl_module.bundle
        inputs, completion, mask = probe_inputs(bundle)
        device = pl_module.device
        inputs = {k: v.to(device) for k, v in inputs.items()}
        pl_module.policy.eval()
        with torch.no_grad():
            logp, _ = completion_logprobs(pl_module.policy, inputs, completion.to(device), mask.to(device))
        # the weights a vLLM engine would receive, gathered from the shards (collective: every rank iterates)
        weights = {name: tensor.cpu() for name, tensor in vllm_weights(pl_module.policy)}
        if trainer.global_rank == 0:
            torch.save({"logp": logp.cpu(), "vllm_weights": weights}, self.out)
