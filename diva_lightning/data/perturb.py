"""Image perturbations for easy-tier variants, run batched on the images' device with Kornia (design.md s4).

The DataModule plans variants on the host and records, per image, the numbers below in a
:class:`PerturbParams`; ``on_after_batch_transfer`` then calls :func:`perturb_images` on the accelerator.

Ops, applied in this fixed order (geometry first, then resolution loss, then additive noise so that noise
is never smoothed away by a later op):

1. ``rotation_deg``: counter-clockwise rotation about the centre (Kornia convention, the same sense as
   PIL's ``Image.rotate`` used officially). The official code rotates with ``expand=True`` and fills the
   new corners with the mean colour of an image edge. A batch keeps its shape, so instead we *shrink to
   fit* (``fit_rotation=True``): the rotated image is scaled by ``min(W/W', H/H')`` (``W', H'`` = its
   bounding box) so no content is cropped, which is what ``expand=True`` followed by the processor's
   resize amounts to. The uncovered area is filled with the mean colour of the image's 1-pixel border
   (all four sides; officially one side chosen by the angle): white for the usual white-background
   diagram, and no artificial frame for photos. Bilinear sampling.
2. ``downup_factor`` in (0, 1]: resize down to ``max(1, int(size * factor))`` with nearest neighbour, then
   back up bilinearly (the official ``add_low_resolution``: NEAREST down, BILINEAR up). 1 = off.
3. ``blur_kernel``: Gaussian blur with an odd square kernel, sigma from the kernel size by OpenCV's rule
   ``0.3 * ((k - 1) / 2 - 1) + 0.8`` (official ``cv2.GaussianBlur(img, (k, k), 0)``), reflect borders.
   0 or 1 = off. Samples are grouped by kernel size so each group is one batched call.
4. ``noise_sigma``: additive Gaussian noise with this std on [0, 1] pixels, then clipped to [0, 1].
5. ``salt_pepper`` = p: each pixel (all channels together) becomes black with probability p/2 and white
   with probability p/2. (The official function binarises the image first; we do not.)

Identity samples (all ops off) are never touched: every op runs only on the rows that use it, so those
rows come back bit-exactly. The only Python loops are over distinct kernel sizes / down-up factors.

Randomness: noise and salt-and-pepper come from a counter-based hash (murmur3's 32-bit finaliser over
(per-sample key, pixel index)) rather than ``torch.randn``. A sample's noise is then a function of its
key alone: the same on CPU and CUDA, independent of which other samples share the batch and of their
order (so DDP sharding or regrouping by image shape never changes an image). The key is
``PerturbParams.seed`` (int64, default 0), XOR-ed with one int64 per sample drawn from ``generator``
when one is given (exactly B draws per call, whatever the ops), so the output is deterministic given the
params and the generator's state.

:func:`params_for` maps a ``VariantSpec`` (``image_ops``, ``intensity`` in [0, 1], ``rotation_deg``) to
numbers. Choices (official values from the authors' ``difficulty_utils.py``):

- rotate: ``spec.rotation_deg`` as planned (official multiples of 45/30/1 deg, see core/tiers.py).
- noise: ``sigma = intensity`` (official; the official plan uses intensities 0.30-0.50).
- blur: ``k = max(3, int(50 * intensity))``, +1 if even (official), then capped at the largest odd
  size <= min(H, W) so the kernel fits the image.
- downup: ``factor = clip(1 - intensity, 0.1, 1)`` by default (``downup="monotone"``). The official
  function takes ``factor = intensity``, which makes a *stronger* intensity a *milder* perturbation
  and would contradict the variant's difficulty label (delta grows with intensity); the official
  variant table never calls it, so no official behaviour is lost. ``downup="official"`` gives
  ``clip(intensity, 0.1, 1)``. The 0.1 floor keeps at least a 10x10 image of a 100px input.
- salt_pepper: ``p = 0.2 * intensity`` (our choice: at most 20% corrupted pixels; the official
  function takes p = fraction of pixels but its variant table never uses it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import get_rotation_matrix2d, resize, warp_affine
from torch import Tensor

from diva_lightning.core.choices import IMAGE_OPS, DownUp, check_choice

SALT_PEPPER_SCALE = 0.2  # p = SALT_PEPPER_SCALE * intensity
MIN_DOWNUP_FACTOR = 0.1
_FLOAT_FIELDS = ("rotation_deg", "noise_sigma", "downup_factor", "salt_pepper")
_IDENTITY: dict[str, float] = {
    "rotation_deg": 0.0, "noise_sigma": 0.0, "blur_kernel": 0, "downup_factor": 1.0, "salt_pepper": 0.0,
    "seed": 0,
}


@dataclass
class PerturbParams:
    """Per-sample perturbation parameters; every field is a 1-D tensor of length B on one device.

    Attributes:
        rotation_deg: float32 [B], counter-clockwise degrees; multiples of 360 = off.
        noise_sigma: float32 [B], Gaussian noise std on [0, 1] pixels; 0 = off.
        blur_kernel: int64 [B], odd Gaussian kernel size; 0 or 1 = off.
        downup_factor: float32 [B], down-up resize scale in (0, 1]; 1 = off.
        salt_pepper: float32 [B], fraction of pixels set to black/white; 0 = off.
        seed: int64 [B], per-sample key of the noise hash (see module docstring).
    """

    rotation_deg: Tensor
    noise_sigma: Tensor
    blur_kernel: Tensor
    downup_factor: Tensor
    salt_pepper: Tensor
    seed: Tensor

    def __post_init__(self) -> None:
        lengths = {f.name: tuple(getattr(self, f.name).shape) for f in fields(self)}
        if len({s for s in lengths.values()}) != 1 or len(next(iter(lengths.values()))) != 1:
            raise ValueError(f"PerturbParams fields must be 1-D tensors of one length, got shapes {lengths}")

    def __len__(self) -> int:
        return int(self.rotation_deg.shape[0])

    @classmethod
    def identity(cls, batch_size: int, device: torch.device | str | None = None) -> PerturbParams:
        """B samples with every op off."""
        return cls.from_list([{}] * batch_size, device=device)

    @classmethod
    def from_list(
        cls, items: Sequence[Mapping[str, float]], device: torch.device | str | None = None
    ) -> PerturbParams:
        """One mapping per sample (e.g. from :func:`params_for`); missing keys mean "off"."""
        unknown = sorted({k for item in items for k in item} - set(_IDENTITY))
        if unknown:
            raise ValueError(f"unknown perturbation keys {unknown}; allowed: {sorted(_IDENTITY)}")
        cols = {name: [item.get(name, default) for item in items] for name, default in _IDENTITY.items()}
        return cls(
            **{n: torch.tensor(cols[n], dtype=torch.float32, device=device) for n in _FLOAT_FIELDS},
            blur_kernel=torch.tensor([int(k) for k in cols["blur_kernel"]], dtype=torch.int64, device=device),
            seed=torch.tensor([int(s) for s in cols["seed"]], dtype=torch.int64, device=device),
        )

    @classmethod
    def stack(cls, parts: Sequence[PerturbParams]) -> PerturbParams:
        """Concatenate several parameter sets along the batch dimension (same device)."""
        if not parts:
            return cls.identity(0)
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def to_list(self) -> list[dict[str, float]]:
        """Inverse of :meth:`from_list` (all keys present), e.g. for logging."""
        cols = {f.name: getattr(self, f.name).tolist() for f in fields(self)}
        return [{name: cols[name][i] for name in cols} for i in range(len(self))]

    def to(self, device: torch.device | str) -> PerturbParams:
        return PerturbParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def cat(cls, parts: Sequence[PerturbParams]) -> PerturbParams:
        """The samples of several parameter sets, in order."""
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def select(self, index: Tensor) -> PerturbParams:
        """Rows ``index`` (int64 [n] or bool [B])."""
        index = index.to(self.seed.device)
        return PerturbParams(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def is_identity(self) -> Tensor:
        """bool [B]: True where every op is off (such samples pass through bit-exactly)."""
        return ~(self.rotate_mask() | self.downup_mask() | self.blur_mask() | self.noise_mask()
                 | self.salt_pepper_mask())

    def rotate_mask(self) -> Tensor:
        return torch.remainder(self.rotation_deg, 360.0) != 0

    def downup_mask(self) -> Tensor:
        return self.downup_factor < 1.0

    def blur_mask(self) -> Tensor:
        return self.blur_kernel > 1

    def noise_mask(self) -> Tensor:
        return self.noise_sigma > 0

    def salt_pepper_mask(self) -> Tensor:
        return self.salt_pepper > 0


# ----------------------------------------------------------------------------------------------- hashing
_M32 = 0xFFFFFFFF


def _fmix32_(x: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser, in place on int64 x in [0, 2**32): a bijection with full avalanche.

    The products overflow int64; every torch backend wraps them in two's complement (CPU and CUDA alike,
    which ``test_cuda_matches_cpu`` checks) and the mask keeps the exact low 32 bits.
    """
    x.bitwise_xor_(x >> 16).mul_(0x85EBCA6B).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 13).mul_(0xC2B2AE35).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def _hash(keys: Tensor, count: int, stream: int) -> Tensor:
    """int64 [n, count] of 32-bit hashes: a pure function of (key, position, stream).

    The position hash is shared by all samples ([count], cheap); one finaliser per element then mixes in
    the per-sample key, which keeps the per-element cost at one ``_fmix32_``.
    """
    k = _fmix32_((keys & _M32) ^ _fmix32_(((keys >> 32) & _M32) ^ stream))  # [n]
    ctr = torch.arange(count, device=keys.device, dtype=torch.int64).mul_(0x9E3779B9).bitwise_and_(_M32)
    ctr = _fmix32_(ctr.bitwise_xor_(stream))  # [count]
    return _fmix32_(ctr[None, :] ^ k[:, None])  # [n, count]


def _uniform(keys: Tensor, count: int, stream: int) -> Tensor:
    """float32 [n, count] uniform in (0, 1) with 24-bit resolution."""
    return ((_hash(keys, count, stream) >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def _gaussian(keys: Tensor, shape: tuple[int, ...]) -> Tensor:
    """float32 [n, *shape] standard normal by Box-Muller.

    One 32-bit hash gives both uniforms (16 bits each) and both outputs of the pair are used, so a
    normal costs half a hash. 16-bit uniforms cap |z| at sqrt(2 ln 2**17) = 4.85: irrelevant for image
    noise that is clipped to [0, 1] anyway.
    """
    count = math.prod(shape)
    half = (count + 1) // 2
    h = _hash(keys, half, stream=1)  # [n, half]
    u1 = ((h >> 16).to(torch.float32) + 0.5) * (1.0 / (1 << 16))
    u2 = ((h & 0xFFFF).to(torch.float32) + 0.5) * (1.0 / (1 << 16))
    radius = torch.sqrt(-2.0 * torch.log(u1))
    angle = (2.0 * math.pi) * u2
    z = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)[:, :count]
    return z.reshape(keys.shape[0], *shape)


# ------------------------------------------------------------------------------------------------- ops
def _rotate(x: Tensor, angle: Tensor, fit: bool) -> Tensor:
    """x [n,C,H,W], angle [n] degrees -> rotated [n,C,H,W], uncovered area = mean border colour."""
    n, _, h, w = x.shape
    center = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=x.device, dtype=x.dtype).expand(n, 2)
    scale = torch.ones(n, 2, device=x.device, dtype=x.dtype)
    if fit:
        rad = torch.deg2rad(angle.to(x.dtype))
        c, s = torch.cos(rad).abs(), torch.sin(rad).abs()
        s_fit = torch.minimum(w / (w * c + h * s), h / (w * s + h * c))  # [n], <= 1
        scale = scale * s_fit[:, None]
    matrix = get_rotation_matrix2d(center, angle.to(x.dtype), scale)  # [n,2,3]
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # [n,C,2W+2H]
    fill = border.mean(dim=-1)[:, :, None, None]  # [n,C,1,1]
    out = warp_affine(x, matrix, (h, w), mode="bilinear", padding_mode="fill", align_corners=True,
                      fill_value=fill)
    return out.clamp(0.0, 1.0)


def _downup(x: Tensor, factor: float) -> Tensor:
    h, w = x.shape[-2:]
    small = resize(x, (max(1, int(h * factor)), max(1, int(w * factor))), interpolation="nearest")
    return resize(small, (h, w), interpolation="bilinear", align_corners=False).clamp(0.0, 1.0)


def _blur(x: Tensor, kernel: int) -> Tensor:
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    return gaussian_blur2d(x, (kernel, kernel), (sigma, sigma), border_type="reflect").clamp(0.0, 1.0)


def _apply(out: Tensor, mask: Tensor, fn: Any) -> None:
    """out[rows] = fn(out[rows], rows) for rows where mask is set (in place; untouched rows stay exact)."""
    rows = mask.nonzero().flatten()
    if rows.numel():
        out[rows] = fn(out[rows], rows)


def perturb_images(
    images: Tensor,
    params: PerturbParams,
    *,
    generator: torch.Generator | None = None,
    fit_rotation: bool = True,
) -> Tensor:
    """Apply each sample's perturbations (see module docstring) on ``images.device``.

    Args:
        images: float [B,C,H,W] in [0, 1].
        params: B per-sample parameter rows (moved to ``images.device`` if needed).
        generator: optional; B int64 draws from it are XOR-ed into ``params.seed`` as noise keys.
        fit_rotation: shrink rotated images so no content is cropped (else crop to the frame).

    Returns:
        float [B,C,H,W] in [0, 1]; rows whose params are identity equal the input bit-exactly.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float [B,C,H,W] tensor, got {images.dtype} {tuple(images.shape)}")
    if len(params) != images.shape[0]:
        raise ValueError(f"{len(params)} parameter rows for {images.shape[0]} images")
    p = params.to(images.device)
    keys = p.seed
    if generator is not None:
        draws = torch.randint(0, 2**62, (len(p),), generator=generator, device=generator.device)
        keys = keys ^ draws.to(images.device)
    _, c, h, w = images.shape
    out = images.clone()

    _apply(out, p.rotate_mask(), lambda x, r: _rotate(x, p.rotation_deg[r], fit_rotation))
    factors = p.downup_factor
    for f in torch.unique(factors[p.downup_mask()]).tolist():
        if f <= 0:
            raise ValueError(f"downup_factor must lie in (0, 1], got {f}")
        _apply(out, factors == f, lambda x, r, f=f: _downup(x, f))
    max_kernel = 2 * min(h, w) - 1  # reflect padding needs kernel // 2 < size
    for k in torch.unique(p.blur_kernel[p.blur_mask()]).tolist():
        if k % 2 == 0 or k > max_kernel:
            raise ValueError(f"blur_kernel must be odd and <= {max_kernel} for {h}x{w} images, got {k}")
        _apply(out, p.blur_kernel == k, lambda x, r, k=k: _blur(x, int(k)))
    _apply(out, p.noise_mask(), lambda x, r: (
        x + p.noise_sigma[r].to(x.dtype)[:, None, None, None] * _gaussian(keys[r], (c, h, w)).to(x.dtype)
    ).clamp(0.0, 1.0))

    def salt_pepper(x: Tensor, r: Tensor) -> Tensor:
        u = _uniform(keys[r], h * w, stream=3).reshape(-1, 1, h, w)  # one draw per pixel, all channels
        prob = p.salt_pepper[r][:, None, None, None]
        x = torch.where(u < prob / 2, torch.zeros_like(x), x)
        return torch.where((u >= prob / 2) & (u < prob), torch.ones_like(x), x)

    _apply(out, p.salt_pepper_mask(), salt_pepper)
    return out


# ------------------------------------------------------------------------------------------- variant map
class _SpecLike(Protocol):
    @property
    def image_ops(self) -> Sequence[str]: ...

    @property
    def intensity(self) -> float: ...

    @property
    def rotation_deg(self) -> float: ...


def params_for(
    spec: _SpecLike, *, image_size: tuple[int, int], downup: DownUp = "monotone"
) -> dict[str, float]:
    """Concrete parameters (all five keys, off = identity value) for one image variant.

    Args:
        spec: has ``image_ops`` (subset of ``core.choices.IMAGE_OPS``), ``intensity`` in [0, 1], ``rotation_deg``.
        image_size: (H, W) of the image, to cap the blur kernel.
        downup: "monotone" (factor = 1 - intensity, default) or "official" (factor = intensity).
    """
    unknown = [op for op in spec.image_ops if op not in IMAGE_OPS]
    if unknown:
        raise ValueError(f"unknown image ops {unknown}; allowed: {list(IMAGE_OPS)}")
    check_choice("downup", downup, DownUp)
    t = float(spec.intensity)
    out = {k: float(v) for k, v in _IDENTITY.items() if k != "seed"}
    ops = set(spec.image_ops)
    if "rotate" in ops:
        out["rotation_deg"] = float(spec.rotation_deg)
    if "noise" in ops:
        out["noise_sigma"] = t
    if "blur" in ops:
        k = max(3, int(50 * t))
        k += 1 - k % 2
        largest_odd = min(image_size) - 1 + min(image_size) % 2
        out["blur_kernel"] = float(max(1, min(k, largest_odd)))
    if "downup" in ops:
        f = 1.0 - t if downup == "monotone" else t
        out["downup_factor"] = min(1.0, max(MIN_DOWNUP_FACTOR, f))
    if "salt_pepper" in ops:
        out["salt_pepper"] = SALT_PEPPER_SCALE * t
    return out


def apply_perturbations(images: Sequence[Tensor], params: PerturbParams) -> list[Tensor]:
    """Perturb a flat list of images on their device, batching images of the same shape together.

    Each image's noise is keyed by its own `params.seed`, so grouping never changes a result.
    """
    out = list(images)
    active = (~params.is_identity()).nonzero().flatten().tolist()
    if not active:
        return out
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j in active:
        by_shape.setdefault(tuple(images[j].shape), []).append(j)
    for idx in by_shape.values():
        stacked = torch.stack([images[j] for j in idx])
        sel = torch.tensor(idx, device=params.rotation_deg.device)
        result = perturb_images(stacked, params.select(sel))
        for slot, j in enumerate(idx):
            out[j] = result[slot]
    return out
