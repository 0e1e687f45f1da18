"""A CPU stand-in for an engine with its own copy of the weights (vLLM's situation), for the engine contract tests.

`CopyEngine` samples with a private copy of the policy, returns its own sampling log-probs, and copies the trained
weights in when the system calls `sync_weights` (unless `stale`, which simulates an engine that is never synced).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from diva_lightning.rollout.hf import HFGenerateEngine


class CopyEngine(HFGenerateEngine):
    samples_from_module = False

    def __init__(self, stale: bool = False) -> None:
        super().__init__(return_old_logp=True)
        self.stale = stale
        self.syncs = 0
        self.copy: Any = None

    def setup(self, bundle: Any, *, rank: int, world_size: int, seed: int, sharded: bool) -> None:
        super().setup(bundle, rank=rank, world_size=world_size, seed=seed, sharded=sharded)
        self.copy = copy.deepcopy(bundle)

    def sync_weights(self, model: torch.nn.Module) -> None:
        self.syncs += 1
        if not self.stale:
            self.copy.model.load_state_dict(model.state_dict())

    def generate(self, bundle: Any, inputs: Any, *, num_generations: int, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 256, do_sample: bool = True, seed: int | None = None) -> Any:
        return super().generate(self.copy, inputs, num_generations=num_generations, temperature=temperature,
                                top_p=top_p, max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed)
