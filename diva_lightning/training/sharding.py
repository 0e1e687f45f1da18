"""FSDP2 for Qwen2(.5)-VL policies (design.md section 9), applied in the system's ``configure_model``.

Units: each vision block, the vision tower (its patch embedding and merger), each decoder layer, then the root
(embeddings, final norm, LM head). The vision tower is a unit of its own, beyond the blocks, because
``generate`` in transformers >= 5 encodes the images through ``get_image_features`` *before* the root's
forward: a parameter left in the root would still be sharded there ("mixed torch.Tensor and DTensor").
For the same reason the root must be initialised by a forward of its own before the first ``generate``
(:func:`initialise_root`), or FSDP would take the vision tower for the root.

Lightning's ``ModelParallelStrategy`` builds the device mesh (``data_parallel_size`` = world size,
``tensor_parallel_size`` = 1) and saves distributed checkpoints; this module only shards, gathers and exports.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

LAYER_LISTS = ("language_model.layers", "visual.blocks")  # module-path suffixes of the repeated units
VISION_TOWER = "visual"


def check_strategy(strategy: object) -> list[str]:
    """Problems with a Lightning strategy for this system (FSDP1 is refused: it cannot clip our gradients and
    crashed at the first optimizer step)."""
    from lightning.pytorch.strategies import FSDPStrategy

    if isinstance(strategy, FSDPStrategy):
        return ["trainer.strategy fsdp (FSDP1) is not supported: shard with FSDP2 by stacking "
                "--config experiments/fsdp.yaml (Lightning's ModelParallelStrategy)"]
    return []


def _named(model: nn.Module, suffix: str) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if name == suffix or name.endswith("." + suffix)]


def vision_towers(model: nn.Module) -> list[nn.Module]:
    """The vision tower(s) of a (possibly PEFT-wrapped) Qwen2-VL policy."""
    return _named(model, VISION_TOWER)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become FSDP units, innermost first (root excluded)."""
    units: list[nn.Module] = []
    for suffix in LAYER_LISTS:
        for layers in _named(model, suffix):
            units.extend(layers)  # type: ignore[arg-type]
    units.extend(vision_towers(model))
    if not units:
        raise ValueError(f"{type(model).__name__}: no {' / '.join(LAYER_LISTS)} found to shard (not a Qwen2-VL?)")
    return units


def shard_policy(model: nn.Module, mesh: Any, *, param_dtype: torch.dtype | None = None,
                 reduce_dtype: torch.dtype = torch.float32) -> None:
    """``fully_shard`` every unit, then the root, with a mixed-precision policy.

    Args:
        mesh: the data-parallel device mesh (Lightning's ``ModelParallelStrategy`` gives ``device_mesh``).
        param_dtype: compute dtype of the all-gathered weights (bf16 on GPUs); None keeps the stored float32.
        reduce_dtype: dtype of the gradient reduce-scatter (float32).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def initialise_root(model: nn.Module, *, pad_id: int, device: torch.device) -> None:
    """One text-only forward of the root, so FSDP initialises it as the root (see the module docstring).

    Collective: every rank must call it.
    """
    ids = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on the CPU. Collective under FSDP: every rank must call it, and only rank 0
    receives the tensors (the others get an empty dict), which is what an export written by rank 0 needs."""
    if not is_sharded(model):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))


def iter_full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) per state-dict entry, one all-gather at a time (collective under FSDP).

    Peak extra memory is one full parameter, not the whole model: what a rollout engine's weight sync needs.
    """
    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()
