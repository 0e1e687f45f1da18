"""Qwen2-VL image preprocessing in pure torch, on the images' device.

Images reach the policy as float tensors in [0, 1], often on the accelerator right after the Kornia
perturbations; going back through PIL/numpy (the HF processor) would cost a device round trip per
step. This module reproduces the HF ``Qwen2VLImageProcessor`` steps:

1. ``smart_resize`` target: both sides multiples of ``patch_size * merge_size``, pixel count within
   ``[min_pixels, max_pixels]``, aspect ratio kept.
2. Resize (only when the target differs from the input size). Deviation: torch bicubic with
   antialias (Keys a = -0.75) instead of PIL's bicubic (a = -0.5) on uint8 pixels, so resized images
   differ from HF's by a few grey levels (tests bound the mean difference); same-size images match HF
   to float precision.
3. Normalise with the processor's mean/std (inputs are already in [0, 1], i.e. rescaled).
4. Duplicate the frame ``temporal_patch_size`` times and flatten patches in the order the vision
   tower's ``Conv3d`` patch embedding and 2x2 patch merger expect:
   rows ordered (h-block, w-block, h-in-block, w-in-block), columns (channel, time, y, x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VisionSpec:
    """The processor settings the preprocessing needs, read once from an HF image processor."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    do_normalize: bool = True

    @classmethod
    def from_processor(cls, image_processor: Any) -> VisionSpec:
        """Read a ``Qwen2VLImageProcessor``/``...Pil`` (v5 ``size`` dict or legacy min/max_pixels)."""
        size = image_processor.size
        get = size.get if isinstance(size, dict) else (lambda k, d=None: getattr(size, k, d))
        min_pixels = get("shortest_edge", None) or getattr(image_processor, "min_pixels", None)
        max_pixels = get("longest_edge", None) or getattr(image_processor, "max_pixels", None)
        if min_pixels is None or max_pixels is None:
            raise ValueError(f"image processor has no min/max pixel budget: size={size}")
        return cls(
            patch_size=int(image_processor.patch_size),
            merge_size=int(image_processor.merge_size),
            temporal_patch_size=int(image_processor.temporal_patch_size),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=tuple(float(x) for x in image_processor.image_mean),  # type: ignore[arg-type]
            image_std=tuple(float(x) for x in image_processor.image_std),  # type: ignore[arg-type]
            do_normalize=bool(getattr(image_processor, "do_normalize", True)),
        )


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept.

    Same rule as the Qwen2-VL processor (rounding to the nearest multiple first, then scaling down
    with floor or up with ceil when the area is out of budget).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be < 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify(image: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """Flatten one normalised image into vision-tower patches.

    Args:
        image: [C, H, W], H and W multiples of ``patch_size * merge_size``.
    Returns:
        [gh * gw, C * temporal_patch_size * patch_size**2] with gh = H / patch_size, gw = W / patch_size.
    """
    c, h, w = image.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]: merge groups contiguous
    x = x.unsqueeze(5).expand(*x.shape[:5], t, p, p)  # a still image is t identical frames
    return x.reshape(gh * gw, c * t * p * p)


def preprocess_images(
    images: Sequence[torch.Tensor], image_processor: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn images into ``pixel_values`` and ``image_grid_thw`` for a Qwen2(.5)-VL model.

    Args:
        images: K float tensors [3, H_k, W_k] in [0, 1] (any device; sizes may differ).
        image_processor: the checkpoint's HF image processor (only its settings are read).
    Returns:
        pixel_values: [sum_k gh_k * gw_k, 3 * temporal_patch_size * patch_size**2] float32, images'
            device, images concatenated in order.
        image_grid_thw: [K, 3] long, rows (1, gh_k, gw_k); the model uses gh*gw/merge**2 tokens per image.
    """
    spec = (
        image_processor
        if isinstance(image_processor, VisionSpec)
        else VisionSpec.from_processor(image_processor)
    )
    if len(images) == 0:
        raise ValueError("preprocess_images needs at least one image")
    device = images[0].device
    factor = spec.patch_size * spec.merge_size
    mean = torch.tensor(spec.image_mean, device=device, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.image_std, device=device, dtype=torch.float32).view(3, 1, 1)
    patches: list[torch.Tensor] = []
    grids: list[tuple[int, int, int]] = []
    for k, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image {k}: expected [3, H, W], got {tuple(image.shape)}")
        x = image.to(device=device, dtype=torch.float32)
        h, w = x.shape[-2:]
        th, tw = smart_resize(h, w, factor=factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
        if (th, tw) != (h, w):
            # antialias matters when shrinking (PIL filters over the whole footprint too); the clamp
            # mimics PIL's uint8 saturation of bicubic overshoot.
            x = F.interpolate(x[None], size=(th, tw), mode="bicubic", align_corners=False, antialias=True)[0]
            x = x.clamp(0.0, 1.0)
        if spec.do_normalize:
            x = (x - mean) / std
        patches.append(patchify(x, spec))
        grids.append((1, th // spec.patch_size, tw // spec.patch_size))
    pixel_values = torch.cat(patches, dim=0)
    image_grid_thw = torch.tensor(grids, dtype=torch.long, device=device)
    return pixel_values, image_grid_thw


def num_image_tokens(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """[K, 3] grids -> [K] number of ``<|image_pad|>`` tokens (one per merged patch)."""
    return image_grid_thw.prod(dim=-1) // (merge_size**2)


def unpatchify_images(
    pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, image_processor: Any
) -> list[torch.Tensor]:
    """Inverse of :func:`preprocess_images` after the resize: back to K images [3, H, W] in [0, 1].

    Used to hand images that were preprocessed (and perturbed) on device to engines that take raw
    images (vLLM). Sizes are already multiples of the patch factor, so a Qwen processor with the same
    pixel budget keeps them as they are and yields the same number of image tokens.

    Args:
        pixel_values: [sum_k gh_k * gw_k, 3 * T * p * p].
        image_grid_thw: [K, 3] long, rows (1, gh_k, gw_k).
    """
    spec = (
        image_processor
        if isinstance(image_processor, VisionSpec)
        else VisionSpec.from_processor(image_processor)
    )
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    device = pixel_values.device
    mean = torch.tensor(spec.image_mean, device=device, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.image_std, device=device, dtype=torch.float32).view(3, 1, 1)
    images: list[torch.Tensor] = []
    start = 0
    for _, gh, gw in image_grid_thw.tolist():
        rows = pixel_values[start : start + gh * gw].float()
        start += gh * gw
        x = rows.reshape(gh // m, gw // m, m, m, 3, t, p, p)[
            :, :, :, :, :, 0
        ]  # first of the identical frames
        x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)  # undo [gh/m, gw/m, m, m, C, p, p]
        if spec.do_normalize:
            x = x * std + mean
        images.append(x)
    return images


def dummy_image(config: Any, *, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest image a Qwen2(.5)-VL vision tower accepts (one merged token, zero pixels): ``pixel_values``
    [merge**2, C * T * p * p] and ``image_grid_thw`` [[1, merge, merge]]. Run through the tower when a batch holds
    no image so that a sharded tower is still gathered on every rank (its features are then discarded)."""
    vc = config.vision_config
    m, p, t = int(vc.spatial_merge_size), int(vc.patch_size), int(vc.temporal_patch_size)
    channels = int(getattr(vc, "in_channels", getattr(vc, "in_chans", 3)))
    pixels = torch.zeros(m * m, channels * t * p * p, device=device)
    grid = torch.tensor([[1, m, m]], dtype=torch.long, device=device)
    return pixels, grid
