"""The policy's life outside the round: loading, LoRA, FSDP2 sharding, the prompt budget, generation set-up, export.

Sharding (issue 10): under Lightning's `ModelParallelStrategy` (`experiments/fsdp.yaml`), `build_policy` shards the
policy (and the reference) with FSDP2 (`training.sharding`); checkpoints are distributed; `export_policy` gathers
the full weights on every rank and rank 0 writes a `save_pretrained` folder.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig

from diva_lightning.core.seeding import stable_seed
from diva_lightning.models.embedded import EMBEDDED
from diva_lightning.models.lora import apply_lora, is_lora, lora_scale, merge_lora_state_dict
from diva_lightning.models.policy import (
    PolicyBundle,
    load_policy,
    load_tokenizer_and_processor,
    resolve_policy_source,
)
from diva_lightning.models.prompt import PromptConfig
from diva_lightning.models.vision import VisionSpec
from diva_lightning.system.stages import TrainingSystem
from diva_lightning.training import sharding
from diva_lightning.training.config import PolicyConfig
from diva_lightning.training.prompt_budget import PromptMeasure, longest_prompt, prompt_limit

# The authors' image budget (official-diva.md): a stock Qwen2.5-VL processor would allow 12.8 MP per image.
AUTHORS_PIXELS = (262_144, 1_048_576)
# config values naming the embedded base policy: the shipped build, or a local rebuild (built when missing)
EMBEDDED_POLICIES = (EMBEDDED, "artifacts/base_policy")


def pixel_budget(cfg: PolicyConfig, spec: VisionSpec) -> tuple[int, int]:
    """(min, max) pixels per image for a checkpoint whose processor has ``spec``: the configured values, else
    "auto": the authors' 262,144 .. 1,048,576 for a checkpoint that allows more than 1,048,576 (a stock
    Qwen2.5-VL processor allows 12.8 MP), the checkpoint's own budget otherwise (the embedded policy)."""
    auto = AUTHORS_PIXELS if spec.max_pixels > AUTHORS_PIXELS[1] else (spec.min_pixels, spec.max_pixels)
    return (cfg.min_pixels if cfg.min_pixels is not None else auto[0],
            cfg.max_pixels if cfg.max_pixels is not None else auto[1])


def load_bundle(policy: str, cfg: PolicyConfig, prompt: PromptConfig) -> PolicyBundle:
    """The checkpoint ``policy`` with the configured dtype, attention and pixel budget."""
    bundle = load_policy(policy, dtype=cfg.dtype, prompt=prompt, attn_implementation=cfg.attention())
    lo, hi = pixel_budget(cfg, bundle.vision_spec)
    bundle.set_pixel_budget(min_pixels=lo, max_pixels=hi)
    return bundle


def enforce_prompt_budget(datamodule: Any, policy: str, cfg: PolicyConfig, prompt: PromptConfig,
                          max_new_tokens: int) -> None:
    """Every question's longest prompt must fit (before the model loads: tokenizer and config only); the data
    module drops or refuses what does not (`cfg.prompt_overflow`)."""
    source, local = resolve_policy_source(policy)
    tokenizer, processor = load_tokenizer_and_processor(source, local_only=local)
    spec = VisionSpec.from_processor(processor)
    lo, hi = pixel_budget(cfg, spec)
    measure = PromptMeasure(tokenizer, prompt, replace(spec, min_pixels=lo, max_pixels=hi))
    config = AutoConfig.from_pretrained(source, local_files_only=local)
    context = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
    limit = prompt_limit(context=context, max_new_tokens=max_new_tokens, max_prompt_length=cfg.max_prompt_length)

    def longest(record: Any, sizes: list[tuple[int, int]], with_variants: bool) -> int:
        return longest_prompt(record, measure, sizes, with_variants=with_variants)

    datamodule.enforce_prompt_budget(longest, limit, cfg.prompt_overflow)


@dataclass
class BuiltPolicy:
    """The loaded policy (train mode; LoRA-wrapped and sharded as configured) and the frozen reference, if any."""

    bundle: PolicyBundle
    policy: torch.nn.Module
    reference: torch.nn.Module | None


def check_mesh(mesh: Any, world_size: int) -> None:
    """ModelParallelStrategy must be pure data parallelism over every process."""
    dp = mesh["data_parallel"].size()
    if dp != world_size or mesh["tensor_parallel"].size() != 1:
        raise ValueError(f"ModelParallelStrategy: set data_parallel_size to the world size "
                         f"({world_size} = devices x num_nodes) and tensor_parallel_size to 1; got "
                         f"{dp} x {mesh['tensor_parallel'].size()} (experiments/fsdp.yaml)")


def build_policy(policy: str, cfg: PolicyConfig, prompt: PromptConfig, *, with_reference: bool, mesh: Any = None,
                 param_dtype: torch.dtype | None = None) -> BuiltPolicy:
    """Load, freeze the vision tower, gradient checkpointing, LoRA, FSDP2 over ``mesh`` (None: not sharded), and
    a frozen reference copy when ``with_reference`` (a KL term without LoRA)."""
    bundle = load_bundle(policy, cfg, prompt)
    model = bundle.model
    if cfg.freeze_vision_tower:
        for tower in sharding.vision_towers(model):
            tower.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        lora = cfg.lora
        model = apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                           target_modules=lora.target_modules, include_vision=lora.include_vision)
        bundle.model = model
    if mesh is not None:
        sharding.shard_policy(model, mesh, param_dtype=param_dtype)
    # load_policy returns an eval-mode model; the system trains it (the engine and Lightning's validation
    # loop switch to eval and back where needed).
    model.train()
    reference = None
    if with_reference and cfg.lora is None:
        reference = load_bundle(policy, cfg, prompt).model.requires_grad_(False).eval()
        if mesh is not None:
            sharding.shard_policy(reference, mesh, param_dtype=param_dtype)
    return BuiltPolicy(bundle, model, reference)


def prepare_generation(system: TrainingSystem) -> None:
    """Once per process, when ranks and devices exist: the reference on the device, the FSDP root forward and the
    engine's set-up (seeded by the system's seed and rank)."""
    s = system
    assert s.bundle is not None and s.policy is not None
    pad_id = int(s.bundle.tokenizer.pad_token_id)
    if s.reference is not None and not s.sharded:
        s.reference.to(s.device)
    if s.sharded:
        sharding.initialise_root(s.policy, pad_id=pad_id, device=s.device)
        if s.reference is not None:
            sharding.initialise_root(s.reference, pad_id=pad_id, device=s.device)
    s.engine.setup(s.bundle, rank=s.global_rank, world_size=s.world_size,
                   seed=stable_seed("engine", s.seed, s.global_rank), sharded=s.sharded)


def export_state_dict(policy: torch.nn.Module) -> dict[str, Tensor]:
    """The policy's full weights in the base model's names, LoRA adapters merged.

    Collective under FSDP (every rank must call it); only rank 0 receives the tensors there.
    """
    state = sharding.full_state_dict(policy)
    if state and is_lora(policy):
        state = merge_lora_state_dict(state, scale=lora_scale(policy))
    return state


def export_policy(bundle: PolicyBundle, policy: torch.nn.Module, out_dir: str | Path, *, rank: int) -> Path | None:
    """Write the policy as a standard `save_pretrained` folder that `load_policy` reads.

    Every rank must call it (the full weights are gathered from the shards); rank 0 writes and gets the
    path, the other ranks get None.
    """
    state = export_state_dict(policy)
    if rank != 0:
        return None
    base = policy.get_base_model() if is_lora(policy) else policy  # type: ignore[operator]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out, state_dict=state)  # type: ignore[operator]
    bundle.tokenizer.save_pretrained(out)
    bundle.image_processor.save_pretrained(out)
    return out
