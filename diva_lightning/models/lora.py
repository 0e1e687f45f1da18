"""LoRA adapters on a Qwen2(.5)-VL policy through PEFT, and their merge for export.

The vision tower is excluded by default (EasyR1 and verl do the same): adapters go on the language model's
attention and MLP projections. An exported policy is always a plain ``save_pretrained`` checkpoint with the
adapters merged (``W + (alpha / r) B A``), so ``load_policy`` and vLLM read it like any other.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


def target_pattern(names: list[str], *, include_vision: bool) -> str:
    """PEFT ``target_modules`` regex (full match on module paths) for modules whose last name is in ``names``."""
    alternatives = "|".join(re.escape(n) for n in names)
    guard = "" if include_vision else r"(?!.*\bvisual\b)"
    return rf"^{guard}.*\.({alternatives})$"


def apply_lora(model: nn.Module, *, rank: int, alpha: int, dropout: float, target_modules: list[str],
               include_vision: bool) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (only they train); returns the PEFT model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=target_pattern(target_modules, include_vision=include_vision))
    peft_model = get_peft_model(model, config)
    if not any("lora_" in name for name, _ in peft_model.named_parameters()):
        raise ValueError(f"LoRA target_modules {target_modules} matched no module of {type(model).__name__}")
    return peft_model


def is_lora(model: nn.Module) -> bool:
    return any("lora_A" in name for name, _ in model.named_parameters())


def merge_lora_state_dict(state: dict[str, torch.Tensor], *, scale: float, adapter: str = "default"
                          ) -> dict[str, torch.Tensor]:
    """A PEFT LoRA model's state dict -> the base model's, with ``W + scale * B @ A`` merged in.

    Args:
        state: keys like ``base_model.model.<path>.base_layer.weight`` and ``<path>.lora_{A,B}.<adapter>.weight``.
        scale: ``alpha / r``.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        out[name] = value
        if key.endswith(".base_layer.weight"):
            stem = key[: -len("base_layer.weight")]
            a, b = state[f"{stem}lora_A.{adapter}.weight"], state[f"{stem}lora_B.{adapter}.weight"]
            merged = value.float() + scale * (b.float() @ a.float())
            out[name] = merged.to(value.dtype)
    return out


def lora_scale(model: Any, adapter: str = "default") -> float:
    config = model.peft_config[adapter]
    return float(config.lora_alpha) / float(config.r)
