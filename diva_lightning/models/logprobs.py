"""Per-token log-probabilities (and entropy) of completions under a Qwen2(.5)-VL policy.

Prompt + completion are re-scored in one forward pass. ``mm_token_type_ids`` is extended with zeros
over the completion (text), the attention mask with ones (HF ``generate`` also attends to the pads
that follow an early EOS, so the masked tails see the same context; their values are masked anyway),
and images are repeated per response when several responses share a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from transformers import PreTrainedModel

from diva_lightning.models.vision import num_image_tokens

_ROW_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")


def images_per_row(
    prompt_inputs: Mapping[str, torch.Tensor], *, image_token_id: int, merge_size: int
) -> torch.Tensor:
    """[P] number of images in each prompt row, recovered from the pad counts and the grids.

    Images are stored row after row (``PolicyBundle.encode`` order), so walking the per-image token
    counts against each row's ``<|image_pad|>`` count assigns them.
    """
    input_ids = prompt_inputs["input_ids"]
    counts = torch.zeros(input_ids.shape[0], dtype=torch.long)
    if "image_grid_thw" not in prompt_inputs:
        return counts
    per_image = num_image_tokens(prompt_inputs["image_grid_thw"], merge_size).tolist()
    pads_per_row = (input_ids == image_token_id).sum(dim=1).tolist()
    k = 0
    for row, pads in enumerate(pads_per_row):
        while pads > 0:
            if k >= len(per_image):
                raise ValueError(f"row {row} has more image pads than the grids account for")
            pads -= per_image[k]
            counts[row] += 1
            k += 1
        if pads < 0:
            raise ValueError(f"row {row}: image pad count does not match the image grids")
    if k != len(per_image):
        raise ValueError(f"{len(per_image)} images but only {k} are placed in the prompts")
    return counts


def repeat_prompt_inputs(
    prompt_inputs: Mapping[str, torch.Tensor],
    prompt_index: torch.Tensor,
    *,
    image_token_id: int,
    merge_size: int,
) -> dict[str, torch.Tensor]:
    """Select prompt rows ``prompt_index`` (repeats allowed), with the matching images.

    Args:
        prompt_inputs: ``PolicyBundle.encode`` output for P prompts.
        prompt_index: [N] long, values in [0, P).
    Returns:
        the same keys for N rows; pixel_values / image_grid_thw hold each selected row's images in row order.
    """
    index = prompt_index.to(prompt_inputs["input_ids"].device)
    out = {k: prompt_inputs[k][index] for k in _ROW_KEYS if k in prompt_inputs}
    if "image_grid_thw" not in prompt_inputs:
        return out
    grid = prompt_inputs["image_grid_thw"]
    n_img = images_per_row(prompt_inputs, image_token_id=image_token_id, merge_size=merge_size)
    patches = grid.prod(dim=-1).cpu()  # [K] patch rows of pixel_values per image
    img_start = torch.cumsum(n_img, 0) - n_img  # first image of each row
    patch_start = torch.cumsum(patches, 0) - patches  # first pixel_values row of each image
    img_ids: list[int] = []
    for row in index.tolist():
        img_ids.extend(range(int(img_start[row]), int(img_start[row] + n_img[row])))
    if not img_ids:
        return out
    patch_rows = torch.cat(
        [torch.arange(int(patch_start[k]), int(patch_start[k] + patches[k])) for k in img_ids]
    )
    out["pixel_values"] = prompt_inputs["pixel_values"][patch_rows.to(grid.device)]
    out["image_grid_thw"] = grid[torch.tensor(img_ids, device=grid.device)]
    return out


def _score(
    model: PreTrainedModel,
    prompt_inputs: Mapping[str, torch.Tensor],
    completion_ids: torch.Tensor,
    *,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward over rows already aligned with ``completion_ids`` [n, T] -> ([n, T], [n, T] | None)."""
    n, t = completion_ids.shape
    inputs = dict(prompt_inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    ones = torch.ones_like(completion_ids, dtype=inputs["attention_mask"].dtype)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=1)
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([mm, torch.zeros_like(completion_ids, dtype=mm.dtype)], dim=1)
    # logits at positions L-1 .. L+T-2 predict the T completion tokens; skipping the prompt's other
    # positions saves the lm_head (the largest matmul with a real 152k vocabulary).
    logits = model(**inputs, use_cache=False, logits_to_keep=t + 1).logits[:, :-1, :]
    logits = logits.float() / temperature  # [n, T, V]
    logz = torch.logsumexp(logits, dim=-1)  # [n, T]
    logp = logits.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1) - logz
    entropy = None
    if with_entropy:
        probs = torch.softmax(logits, dim=-1)
        entropy = logz - (probs * logits).sum(dim=-1)  # H = log Z - E_p[logit]
    return logp, entropy


def completion_logprobs(
    model: PreTrainedModel,
    prompt_inputs: Mapping[str, torch.Tensor],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    prompt_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of completion tokens under ``model`` at ``temperature``.

    Args:
        model: a Qwen2(.5)-VL ``...ForConditionalGeneration``.
        prompt_inputs: ``PolicyBundle.encode`` output (left-padded), P rows.
        completion_ids: [N, T] long, sampled continuations.
        completion_mask: [N, T], 1 on real completion tokens (through the first EOS), 0 after.
        temperature: logits are divided by it, as in sampling, so ratios compare like with like.
        with_entropy: also return the per-token entropy of the tempered distribution.
        prompt_index: [N] prompt row of each completion; default ``arange(N)`` (requires N == P).
        chunk_size: score at most this many rows per forward (memory bound; results are identical).
    Returns:
        logp [N, T] float32 and entropy [N, T] float32 or None; both 0 where ``completion_mask`` is 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n = completion_ids.shape[0]
    if prompt_index is None:
        if prompt_inputs["input_ids"].shape[0] != n:
            raise ValueError("prompt_index is required when completions and prompts differ in number")
        prompt_index = torch.arange(n)
    cfg = model.config
    merge = int(cfg.vision_config.spatial_merge_size)
    step = n if chunk_size is None else max(1, chunk_size)
    logps: list[torch.Tensor] = []
    ents: list[torch.Tensor] = []
    for lo in range(0, n, step):
        rows = slice(lo, min(n, lo + step))
        chunk_inputs = repeat_prompt_inputs(
            prompt_inputs, prompt_index[rows], image_token_id=int(cfg.image_token_id), merge_size=merge
        )
        logp, ent = _score(
            model, chunk_inputs, completion_ids[rows], temperature=temperature, with_entropy=with_entropy
        )
        logps.append(logp)
        if ent is not None:
            ents.append(ent)
    mask = completion_mask.to(dtype=torch.float32, device=logps[0].device)
    logp_all = torch.cat(logps, dim=0) * mask
    entropy_all = torch.cat(ents, dim=0) * mask if with_entropy else None
    return logp_all, entropy_all
