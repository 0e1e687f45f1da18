"""Torch Qwen2-VL preprocessing against the HF image processor (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from diva_lightning.models.tiny import tiny_image_processor
from diva_lightning.models.vision import (
    VisionSpec,
    num_image_tokens,
    preprocess_images,
    smart_resize,
    unpatchify_images,
)


def _uint8_image(h: int, w: int, seed: int, smooth: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if smooth:  # low-frequency content, like rendered diagrams after blur: resampling kernels agree more
        x = F.interpolate(
            torch.rand(1, 3, h // 8 + 2, w // 8 + 2, generator=g), size=(h, w), mode="bilinear"
        )[0]
        return (x * 255).round().to(torch.uint8)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _hf(images_u8: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    out = tiny_image_processor()(images=[im.numpy() for im in images_u8], return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize("size", [(112, 112), (56, 84), (84, 112)])
def test_no_resize_sizes_equal_hf(size: tuple[int, int]) -> None:
    images = [_uint8_image(*size, seed=s) for s in range(2)]
    ref_pv, ref_grid = _hf(images)
    pv, grid = preprocess_images([im.float() / 255 for im in images], tiny_image_processor())
    assert torch.equal(grid, ref_grid)
    # same arithmetic up to float rounding of the 1/255 rescale (HF multiplies by 1/255 in numpy)
    torch.testing.assert_close(pv, ref_pv.float(), rtol=0, atol=2e-6)


def test_112_image_gives_8x8_grid_and_16_tokens() -> None:
    pv, grid = preprocess_images([torch.rand(3, 112, 112)], tiny_image_processor())
    assert grid.tolist() == [[1, 8, 8]]
    assert num_image_tokens(grid, 2).tolist() == [16]
    assert pv.shape == (64, 3 * 2 * 14 * 14)


def test_resized_sizes_close_to_hf() -> None:
    """Interpolation differs (torch bicubic a=-0.75 + antialias on floats vs PIL bicubic a=-0.5 on
    uint8), so only the size of the difference is bounded. Normalised units: 1 grey level ~ 0.015."""
    images = [_uint8_image(100, 150, seed=1, smooth=True), _uint8_image(300, 200, seed=2, smooth=True)]
    ref_pv, ref_grid = _hf(images)
    pv, grid = preprocess_images([im.float() / 255 for im in images], tiny_image_processor())
    assert torch.equal(grid, ref_grid)  # same smart-resize targets: 100x150 -> 84x112, 300x200 -> 112x84
    diff = (pv - ref_pv.float()).abs()
    assert diff.mean() < 0.01, diff.mean()  # measured 0.004 (a third of a grey level)
    assert diff.max() < 0.05  # measured 0.015


def test_smart_resize_matches_hf_rule() -> None:
    for h in range(20, 700, 37):
        for w in range(20, 700, 53):
            for lo, hi in [(56 * 56, 112 * 112), (56 * 56, 28 * 28 * 1280)]:
                ours = smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
                assert ours == hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi), (h, w)


def test_unpatchify_inverts_preprocess() -> None:
    images = [torch.rand(3, 112, 56), torch.rand(3, 56, 84)]  # sizes that need no resize
    pv, grid = preprocess_images(images, tiny_image_processor())
    back = unpatchify_images(pv, grid, tiny_image_processor())
    for a, b in zip(images, back):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_vision_spec_reads_processor_and_rejects_bad_input() -> None:
    spec = VisionSpec.from_processor(tiny_image_processor())
    assert (spec.min_pixels, spec.max_pixels) == (56 * 56, 112 * 112)
    assert np.allclose(spec.image_mean, [0.48145466, 0.4578275, 0.40821073])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        preprocess_images([torch.rand(1, 3, 56, 56)], spec)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_images_device() -> None:
    images = [torch.rand(3, 112, 112), torch.rand(3, 90, 130)]
    pv_cpu, grid_cpu = preprocess_images(images, tiny_image_processor())
    pv, grid = preprocess_images([im.cuda() for im in images], tiny_image_processor())
    assert pv.is_cuda and grid.is_cuda
    torch.testing.assert_close(pv.cpu(), pv_cpu, rtol=0, atol=1e-4)
