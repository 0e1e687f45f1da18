"""Which weight dtype / trainer precision pairs train correctly, and the float32 master copies for bf16 weights.

A bf16 weight cannot take an AdamW update at the paper's lr 1e-6: the step (~1e-6) is far below half a bf16 ulp
of a typical weight (~1e-4 at |w| = 0.02), so the rounded weight never moves (measured before this module
existed: 1.9% of the weights changed in 10 steps). Supported, everything else refused at start-up:

- float32 weights, `32-true`: float32 everywhere (CPU default);
- float32 weights, `bf16-mixed`: bf16 compute (autocast; under FSDP2 a bf16 mixed-precision policy), float32
  master weights and gradient reduction (GPU default);
- bfloat16 weights (`policy_config.dtype`), `32-true` or `bf16-true`: bf16 weights and compute, AdamW on float32
  master copies (`MasterWeightAdamW`); not under FSDP2.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

SUPPORTED = {
    ("float32", "32-true"): "float32 weights and compute",
    ("float32", "bf16-mixed"): "bf16 compute, float32 master weights",
    ("bfloat16", "32-true"): "bf16 weights, float32 master copies in the optimizer",
    ("bfloat16", "bf16-true"): "bf16 weights, float32 master copies in the optimizer",
}
_ADVICE = ("use policy_config.dtype float32 with trainer.precision 32-true (CPU) or bf16-mixed (GPUs: bf16 compute, "
           "float32 master weights), or policy_config.dtype bfloat16 with 32-true/bf16-true (float32 master copies)")


def check_precision(dtype: str, precision: str, *, sharded: bool) -> list[str]:
    """Problems with this weight dtype / trainer precision pair (empty when it trains correctly)."""
    if (dtype, precision) not in SUPPORTED:
        return [f"policy_config.dtype {dtype} with trainer.precision {precision} is not supported: {_ADVICE}"]
    if sharded and dtype != "float32":
        return ["under FSDP2 keep policy_config.dtype float32: trainer.precision bf16-mixed shards float32 master "
                "weights and computes in bf16"]
    return []


def needs_master_weights(dtype: str) -> bool:
    return dtype != "float32"


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW that updates float32 master copies of low-precision parameters and writes them back after each step.

    The optimizer's own parameters are the float32 masters; the model's (bf16) parameters receive the gradients.
    ``step`` copies each gradient into its master, runs AdamW in float32 and casts the masters back into the
    model. The masters are part of ``state_dict`` (key ``master_params``), so a resumed run continues from the
    exact float32 values, not from their bf16 roundings.
    """

    def __init__(self, params: Iterable[Tensor], **kwargs: Any) -> None:
        self.model_params = [p for p in params]
        masters = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in self.model_params]
        super().__init__(masters, **kwargs)

    @property
    def masters(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for model_p, master in zip(self.model_params, self.masters):
            master.grad = None if model_p.grad is None else model_p.grad.to(torch.float32)
        super().step()
        for model_p, master in zip(self.model_params, self.masters):
            model_p.copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for p in self.model_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["master_params"] = [m.detach().clone() for m in self.masters]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        masters = state.pop("master_params", None)
        super().load_state_dict(state)
        if masters is not None:
            with torch.no_grad():
                for master, saved, model_p in zip(self.masters, masters, self.model_params):
                    master.copy_(saved)
                    model_p.copy_(saved)
