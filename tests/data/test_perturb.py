"""Kornia image perturbations: exact identity, direction of each op, per-sample independence, determinism."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from diva_lightning.core.tiers import VariantSpec
from diva_lightning.data.perturb import PerturbParams, params_for, perturb_images


def rand_images(b: int = 4, h: int = 32, w: int = 32, seed: int = 0) -> Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def high_freq_energy(x: Tensor) -> Tensor:
    """Mean squared neighbour difference per image: [B,C,H,W] -> [B]."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return dx.pow(2).mean(dim=(1, 2, 3)) + dy.pow(2).mean(dim=(1, 2, 3))


ONE_OF_EACH = [
    {"rotation_deg": 30.0},
    {"noise_sigma": 0.2},
    {"blur_kernel": 7},
    {"downup_factor": 0.5},
    {"salt_pepper": 0.1},
    {"rotation_deg": 45.0, "noise_sigma": 0.3, "blur_kernel": 5, "downup_factor": 0.7, "salt_pepper": 0.05},
]


# --------------------------------------------------------------------------------------------- identity
def test_identity_rows_pass_through_bit_exactly() -> None:
    x = rand_images(8)
    items = [{}, *ONE_OF_EACH, {"rotation_deg": 360.0, "blur_kernel": 1, "downup_factor": 1.0}]
    params = PerturbParams.from_list(items)
    out = perturb_images(x, params)
    ident = params.is_identity()
    assert ident.tolist() == [True, False, False, False, False, False, False, True]
    assert torch.equal(out[ident], x[ident])
    assert all(not torch.equal(out[i], x[i]) for i in (~ident).nonzero().flatten().tolist())
    assert torch.equal(perturb_images(x, PerturbParams.identity(8)), x)
    assert out.data_ptr() != x.data_ptr()  # the input is never modified in place


# ------------------------------------------------------------------------------------------ each op
def test_noise_raises_std_of_flat_image_by_sigma() -> None:
    flat = torch.full((3, 3, 64, 64), 0.5)
    params = PerturbParams.from_list([{"noise_sigma": s, "seed": 7} for s in (0.05, 0.1, 0.15)])
    out = perturb_images(flat, params)
    # 12288 values per image: the std of the sample std is ~ sigma / sqrt(2 * 12288) ~ 0.6% of sigma
    torch.testing.assert_close(out.std(dim=(1, 2, 3)), torch.tensor([0.05, 0.1, 0.15]), rtol=0.03, atol=0.0)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), torch.full((3,), 0.5), rtol=0.0, atol=0.005)


def test_noise_is_clipped_to_unit_range() -> None:
    out = perturb_images(torch.full((1, 3, 32, 32), 0.9), PerturbParams.from_list([{"noise_sigma": 0.5}]))
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out == 1.0).float().mean() > 0.3  # ~42% of N(0.9, 0.5) lies above 1 and is clipped there


def test_blur_lowers_high_frequency_energy_monotonically_in_kernel() -> None:
    x = rand_images(1).expand(4, -1, -1, -1).contiguous()
    out = perturb_images(x, PerturbParams.from_list([{"blur_kernel": k} for k in (0, 3, 9, 21)]))
    energy = high_freq_energy(out)
    assert energy[1] < 0.5 * energy[0]
    assert energy[1] > energy[2] > energy[3]
    # blur keeps the mean (reflect borders, normalised kernel)
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), rtol=0.0, atol=0.01)


@pytest.mark.parametrize(("angle", "k"), [(90.0, 1), (180.0, 2), (270.0, 3), (-90.0, -1)])
def test_right_angle_rotation_equals_rot90(angle: float, k: int) -> None:
    x = rand_images(2, 17, 17)
    out = perturb_images(x, PerturbParams.from_list([{"rotation_deg": angle}] * 2))
    # Kornia's positive angle is counter-clockwise as displayed, as torch.rot90 over (H, W)
    torch.testing.assert_close(out, torch.rot90(x, k, dims=(-2, -1)), rtol=0.0, atol=1e-5)


def test_rotation_fills_with_border_colour() -> None:
    colour = torch.tensor([0.2, 0.4, 0.6])
    x = colour[None, :, None, None].expand(1, 3, 24, 24).contiguous()
    out = perturb_images(x, PerturbParams.from_list([{"rotation_deg": 30.0}]))
    torch.testing.assert_close(out, x, rtol=0.0, atol=1e-5)  # no black corners


def test_rotation_fit_keeps_corner_content_crop_loses_it() -> None:
    x = torch.ones(1, 3, 32, 32)
    x[..., 1:4, 1:4] = 0.0  # a dark mark in the corner
    params = PerturbParams.from_list([{"rotation_deg": 45.0}])
    fitted = perturb_images(x, params)
    cropped = perturb_images(x, params, fit_rotation=False)
    assert fitted.min() < 0.3  # the mark survives, shrunk
    assert cropped.min() > 0.9  # the corner was rotated out of the frame


def test_downup_loses_detail_but_keeps_flat_images() -> None:
    x = rand_images(2)
    out = perturb_images(x, PerturbParams.from_list([{"downup_factor": 0.5}, {"downup_factor": 0.25}]))
    energy_in, energy_out = high_freq_energy(x), high_freq_energy(out)
    assert (energy_out < 0.5 * energy_in).all()
    assert energy_out[1] < energy_out[0]
    flat = torch.full((1, 3, 32, 32), 0.3)
    flat_out = perturb_images(flat, PerturbParams.from_list([{"downup_factor": 0.25}]))
    torch.testing.assert_close(flat_out, flat)


def test_salt_pepper_sets_about_p_of_pixels_to_black_or_white() -> None:
    flat = torch.full((2, 3, 64, 64), 0.5)
    params = PerturbParams.from_list([{"salt_pepper": 0.2, "seed": 1}, {"salt_pepper": 0.02}])
    out = perturb_images(flat, params)
    black = (out == 0.0).all(dim=1).float().mean(dim=(1, 2))  # whole pixel (all channels) black
    white = (out == 1.0).all(dim=1).float().mean(dim=(1, 2))
    # 4096 pixels: std of a 10% fraction is ~0.5%
    torch.testing.assert_close(black, torch.tensor([0.1, 0.01]), rtol=0.0, atol=0.015)
    torch.testing.assert_close(white, torch.tensor([0.1, 0.01]), rtol=0.0, atol=0.015)
    untouched = (out == 0.5).all(dim=1).float().mean(dim=(1, 2))
    torch.testing.assert_close(black + white + untouched, torch.ones(2))  # channels move together


# --------------------------------------------------------------------------------------- batch semantics
def test_mixed_batch_equals_each_sample_alone() -> None:
    x = rand_images(len(ONE_OF_EACH) + 1, seed=3)
    items = [{**p, "seed": 100 + i} for i, p in enumerate([{}, *ONE_OF_EACH])]
    batched = perturb_images(x, PerturbParams.from_list(items))
    for i, item in enumerate(items):
        alone = perturb_images(x[i : i + 1], PerturbParams.from_list([item]))
        torch.testing.assert_close(batched[i : i + 1], alone, rtol=0.0, atol=1e-6)
    # and reversing the batch order reverses the output
    rev = perturb_images(x.flip(0), PerturbParams.from_list(items[::-1]))
    torch.testing.assert_close(rev.flip(0), batched, rtol=0.0, atol=1e-6)


def test_deterministic_given_generator() -> None:
    x = rand_images(6)
    params = PerturbParams.from_list(ONE_OF_EACH)
    a = perturb_images(x, params, generator=torch.Generator().manual_seed(5))
    b = perturb_images(x, params, generator=torch.Generator().manual_seed(5))
    c = perturb_images(x, params, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a[1], c[1])  # noise differs with the generator
    torch.testing.assert_close(a[2], c[2])  # blur alone has no randomness
    g = torch.Generator().manual_seed(5)
    first, second = perturb_images(x, params, generator=g), perturb_images(x, params, generator=g)
    assert torch.equal(first, a) and not torch.equal(second[1], a[1])  # the generator advances


def test_output_range_dtype_and_device() -> None:
    x = rand_images(6)
    strong = [{**p, "noise_sigma": 0.8} for p in ONE_OF_EACH]
    out = perturb_images(x, PerturbParams.from_list(strong))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    x = rand_images(6)
    params = PerturbParams.from_list([{**p, "seed": i} for i, p in enumerate(ONE_OF_EACH)])
    cpu = perturb_images(x, params)
    gpu = perturb_images(x.cuda(), params.to("cuda"))
    assert gpu.device.type == "cuda"
    # the hash noise is bit-identical across devices; only interpolation/conv rounding may differ
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0.0, atol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(0)
    assert perturb_images(x.cuda(), params, generator=g).device.type == "cuda"


def test_bad_inputs_are_rejected() -> None:
    x = rand_images(2)
    with pytest.raises(ValueError, match="odd"):
        perturb_images(x, PerturbParams.from_list([{"blur_kernel": 4}, {}]))
    with pytest.raises(ValueError, match="odd and <= 63"):
        perturb_images(x, PerturbParams.from_list([{"blur_kernel": 65}, {}]))
    with pytest.raises(ValueError, match="3 parameter rows for 2 images"):
        perturb_images(x, PerturbParams.identity(3))
    with pytest.raises(ValueError, match="float"):
        perturb_images((x * 255).to(torch.uint8), PerturbParams.identity(2))
    with pytest.raises(ValueError, match="unknown perturbation keys"):
        PerturbParams.from_list([{"sharpen": 1.0}])
    with pytest.raises(ValueError, match="1-D tensors of one length"):
        PerturbParams(*(torch.zeros(2),) * 5, seed=torch.zeros(3, dtype=torch.int64))


def test_params_helpers_round_trip() -> None:
    items = [{"rotation_deg": 30.0, "seed": 4}, {"blur_kernel": 5}, {}]
    params = PerturbParams.from_list(items)
    rows = params.to_list()
    assert rows[0]["rotation_deg"] == 30.0 and rows[0]["seed"] == 4 and rows[1]["blur_kernel"] == 5
    assert PerturbParams.from_list(rows).to_list() == rows
    both = PerturbParams.stack([params, PerturbParams.identity(2)])
    assert len(both) == 5 and both.is_identity().tolist() == [False, False, True, True, True]
    picked = both.select(torch.tensor([1, 0]))
    assert picked.to_list() == [rows[1], rows[0]]
    assert params.blur_kernel.dtype == torch.int64 and params.rotation_deg.dtype == torch.float32


# ----------------------------------------------------------------------------------------- params_for
def image_spec(ops: tuple[str, ...], intensity: float, rotation: float = 0.0) -> VariantSpec:
    return VariantSpec("image", "easy", 1.0, intensity, ops, rotation)


@pytest.mark.parametrize(
    ("ops", "intensity", "size", "key", "value"),
    [
        (("noise",), 0.4, (64, 64), "noise_sigma", 0.4),  # official: sigma = intensity
        (("blur",), 0.4, (64, 64), "blur_kernel", 21),  # int(50 * 0.4) = 20 -> odd 21
        (("blur",), 0.3, (64, 64), "blur_kernel", 15),  # 15 already odd
        (("blur",), 0.02, (64, 64), "blur_kernel", 3),  # floor of 3
        (("blur",), 1.0, (32, 40), "blur_kernel", 31),  # 51 capped at the largest odd <= 32
        (("downup",), 0.3, (64, 64), "downup_factor", 0.7),  # monotone: 1 - intensity
        (("downup",), 0.95, (64, 64), "downup_factor", 0.1),  # floor
        (("salt_pepper",), 0.5, (64, 64), "salt_pepper", 0.1),  # 0.2 * intensity
        (("rotate",), 0.5, (64, 64), "rotation_deg", 137.0),  # the planned angle
    ],
)
def test_params_for_mapping(ops: tuple[str, ...], intensity: float, size: tuple[int, int], key: str,
                            value: float) -> None:
    rot = 137.0 if "rotate" in ops else 0.0
    out = params_for(image_spec(ops, intensity, rot), image_size=size)
    assert out[key] == pytest.approx(value)
    identity = params_for(image_spec((), 0.0), image_size=size)
    assert {k: v for k, v in out.items() if k != key} == {k: v for k, v in identity.items() if k != key}


def test_params_for_official_downup_and_pipeline() -> None:
    official = params_for(image_spec(("downup",), 0.3), image_size=(64, 64), downup="official")
    assert official["downup_factor"] == 0.3
    with pytest.raises(ValueError, match="downup"):
        params_for(image_spec(("downup",), 0.3), image_size=(64, 64), downup="inverse")  # type: ignore[arg-type]
    specs = [image_spec(("rotate", "noise"), 0.45, 30.0), image_spec(("blur", "downup"), 0.6)]
    params = PerturbParams.from_list([params_for(s, image_size=(48, 48)) for s in specs] + [{}])
    x = rand_images(3, 48, 48)
    out = perturb_images(x, params, generator=torch.Generator().manual_seed(0))
    assert params.is_identity().tolist() == [False, False, True]
    assert torch.equal(out[2], x[2]) and not torch.equal(out[0], x[0])
    assert high_freq_energy(out[1:2]) < 0.2 * high_freq_energy(x[1:2])
