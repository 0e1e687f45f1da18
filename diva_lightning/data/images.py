"""Image content checks and the store of decoded images.

Every image a record file names is decoded once, fully, when the file is loaded
(:func:`diva_lightning.data.schema.load_records_with_report`): a corrupt, truncated, empty or garbage image,
or one with more pixels than :data:`MAX_IMAGE_PIXELS`, is a problem of its row, reported with the others
before the model loads, never a crash at the step that first draws the row. The decoded pixels are kept in
an :class:`ImageStore`, so the data module never decodes them again.

The pixel bound exists to refuse decompression bombs and garbage headers, not to size images for the
policy: the policy's processor resizes every image to its own ``min_pixels``/``max_pixels`` budget (the
authors train at 262,144..1,048,576). The default, 16 x 1,048,576 = 16,777,216 pixels (4096 x 4096), is 16
times the authors' per-image budget and above a Qwen2.5-VL processor's own default cap (12,845,056 =
16,384 merged 28 x 28 patches), so every image a Qwen2.5-VL processor would take at native size passes, as
do ordinary photographs up to 16 MP. A 20000 x 20000 image (400 MP, 1.2 GB decoded) is refused from its
header, before any pixel is decoded. (Pillow's own bomb guard refuses more than 178,956,970 pixels
whatever the bound.)

Images are keyed by ``(data file, record id)``: the resolved path of the file a record was read from
(:attr:`QuestionRecord.data_file`) and its id, which is unique within that file. Two files' images can
therefore never collide, even when they share ids, and a relative image path always resolves against the
folder of the file that names it. Records built in code (no data file: the procedural world, benchmark readers)
are told apart by their image references as well, so two sources' questions with the same id keep their own
images.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

MAX_IMAGE_PIXELS = 16 * 1024 * 1024
"""Default bound on width x height of one image (see the module docstring for the choice)."""
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")
"""Formats we decode. Pillow knows more (EPS would run Ghostscript); a data file has no need for them."""

ImageRef = str | bytes


class HasImages(Protocol):
    """What the store needs of a record (`diva_lightning.data.schema.QuestionRecord` has it; a protocol here keeps
    schema -> images a one-way import)."""

    @property
    def id(self) -> str: ...
    @property
    def data_file(self) -> str | None: ...
    @property
    def images(self) -> Sequence[ImageRef]: ...


BACKGROUND = (255, 255, 255)
"""What transparent pixels show: white, as a page or a browser shows a transparent PNG (docs/data.md)."""
MODES = {
    "RGB": "as is",
    "RGBX": "padding byte dropped",
    "L": "grey copied to R, G and B",
    "1": "black/white: 0 or 255 in every channel",
    "P": "palette colours; a transparent palette entry is composited on white",
    "PA": "palette colours, alpha composited on white",
    "RGBA": "alpha composited on white",
    "RGBa": "premultiplied alpha: un-premultiplied, then composited on white",
    "LA": "grey with alpha: composited on white",
    "La": "premultiplied grey with alpha: composited on white",
    "CMYK": "converted to RGB (Pillow's conversion; Adobe-inverted CMYK JPEGs are decoded by Pillow)",
    "YCbCr": "converted to RGB",
    "I;16": "16-bit grey: 0..65535 scaled to 0..255 (not clipped)",
    "I;16L": "as I;16",
    "I;16B": "as I;16",
    "I;16N": "as I;16",
    "I": "32-bit integer grey, as a 16-bit PNG opens in older Pillow: 0..65535 scaled to 0..255; values outside "
         "0..65535 are refused",
    "F": "32-bit float grey: 0..1 scaled to 0..255; values outside 0..1 (or NaN) are refused",
}
"""Every Pillow mode a data image may have, and what it becomes (RGB uint8, as a viewer shows it). EXIF
orientation is applied first, for every mode. Any other mode is refused when the file is loaded."""


class ImageError(ValueError):
    """An image that cannot be used; the message says why (it does not repeat the reference)."""


def describe(ref: ImageRef) -> str:
    """A short human name for an image reference: the path as written, or the size of inline bytes."""
    return repr(ref) if isinstance(ref, str) else f"<{len(ref):,} inline bytes>"


def resolve(ref: str, base_dir: str | Path | None) -> Path:
    """Where a path reference points: absolute as is, relative against ``base_dir`` (default: cwd)."""
    path = Path(ref)
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path


def read_ref(ref: ImageRef, base_dir: str | Path | None) -> bytes:
    """The encoded bytes of a reference; :class:`ImageError` for a missing or unreadable file."""
    if isinstance(ref, bytes | bytearray):
        return bytes(ref)
    path = resolve(ref, base_dir)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except OSError as e:
        raise ImageError(f"cannot read image file {path}: {e.strerror or e}") from None


def _on_background(img: Image.Image) -> Image.Image:
    """An image with alpha (any mode Pillow converts to RGBA) composited on :data:`BACKGROUND`."""
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba).convert("RGB")


def to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded image as uint8 ``[H, W, 3]`` looking as a viewer shows it (see :data:`MODES`): EXIF orientation
    applied, alpha composited on white, 16-bit and float grey scaled to 8 bits (Pillow's own conversion clips
    them: a 16-bit PNG became all white). Raises :class:`ImageError` for a mode not in :data:`MODES`."""
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode not in MODES:
        raise ImageError(f"image mode {mode!r} is not supported; accepted modes: {', '.join(MODES)}")
    if mode in ("I", "F") or mode.startswith("I;16"):
        grey = np.asarray(img).astype(np.float64)
        if mode == "F":
            lo, hi, top = 0.0, 1.0, 1.0
        else:
            lo, hi, top = 0, 65535, 65535.0
        if grey.size and (not np.isfinite(grey).all() or grey.min() < lo or grey.max() > hi):
            raise ImageError(f"{mode} image with values from {grey.min()} to {grey.max()}: outside {lo}..{hi}, "
                             "no unambiguous way to show it")
        level = np.rint(grey * (255.0 / top)).astype(np.uint8)
        return np.repeat(level[:, :, None], 3, axis=2)
    if mode == "La":
        img = img.convert("LA")  # Pillow converts premultiplied grey only to LA
    # a colour key (PNG tRNS on P, L or RGB images) is transparency too
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    rgb = _on_background(img) if has_alpha else img if mode == "RGB" else img.convert("RGB")
    return np.asarray(rgb, dtype=np.uint8)


def decode_bytes(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Tensor:
    """Fully decode encoded image bytes to RGB uint8 ``[3, H, W]`` (contiguous), or raise :class:`ImageError`.

    The size is checked from the header before decoding, so an oversized image costs nothing to refuse.
    """
    if not data:
        raise ImageError("empty image (0 bytes)")
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                                 "(max_image_pixels)")
            if w == 0 or h == 0:
                raise ImageError(f"image has no pixels ({w}x{h})")
            if img.mode not in MODES:
                raise ImageError(f"image mode {img.mode!r} ({img.format}) is not supported; accepted modes: "
                                 f"{', '.join(MODES)} (docs/data.md)")
            img.load()  # the full decode: truncated or corrupt data raises here
            pixels = to_rgb(img)  # [H, W, 3] uint8
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow refuses > 178,956,970 pixels before we see the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "the image"
        raise ImageError(f"{size} is over the limit of {max_pixels:,} (max_image_pixels; refused from the "
                         "header by Pillow's decompression-bomb guard)") from None
    except UnidentifiedImageError:
        raise ImageError(f"not a {'/'.join(FORMATS)} image (unrecognised content, "
                         f"starts with {data[:8]!r})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for bad data
        raise ImageError(f"cannot decode image: {type(e).__name__}: {e}") from None
    # the transpose to [3, H, W] is the only copy; the result is writable and contiguous
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def decode_ref(ref: ImageRef, base_dir: str | Path | None = None, *, max_pixels: int = MAX_IMAGE_PIXELS
               ) -> Tensor:
    """:func:`decode_bytes` of a path (relative to ``base_dir``) or of inline bytes: uint8 ``[3, H, W]``."""
    return decode_bytes(read_ref(ref, base_dir), max_pixels=max_pixels)


def to_float(image: Tensor) -> Tensor:
    """uint8 ``[3, H, W]`` -> float32 in ``[0, 1]`` (what the data pipeline and the policy consume)."""
    return image.to(torch.float32).div_(255.0)


@dataclass(frozen=True)
class DecodeJob:
    """One image to check: ``ref`` as written in the row, resolved against ``base_dir``."""

    ref: ImageRef
    base_dir: Path | None
    keep: bool
    """Return the decoded pixels (otherwise they are dropped as soon as checked)."""
    inline: bool = False
    """Also return the encoded bytes (to replace a path reference by its content)."""


@dataclass(frozen=True)
class DecodeResult:
    pixels: Tensor | None
    data: bytes | None
    error: str | None


def _run(job: DecodeJob, max_pixels: int) -> DecodeResult:
    try:
        data = read_ref(job.ref, job.base_dir)
        pixels = decode_bytes(data, max_pixels=max_pixels)
    except ImageError as e:
        return DecodeResult(None, None, str(e))
    return DecodeResult(pixels if job.keep else None, data if job.inline else None, None)


def default_workers() -> int:
    """Threads used to decode at load time (Pillow releases the GIL while it decodes)."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_all(jobs: Sequence[DecodeJob], *, max_pixels: int = MAX_IMAGE_PIXELS, workers: int | None = None
               ) -> Iterator[DecodeResult]:
    """Check every job, in order; ``workers`` threads (default :func:`default_workers`, 1 = no pool)."""
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(jobs) < 2:
        for job in jobs:
            yield _run(job, max_pixels)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(lambda job: _run(job, max_pixels), jobs)


def record_base_dir(record: HasImages) -> Path | None:
    """The folder a record's relative image paths resolve against: its data file's, else the cwd."""
    return Path(record.data_file).parent if record.data_file else None


class ImageStore:
    """Decoded images of records, kept as uint8 ``[3, H, W]`` (4x smaller than float) and keyed by
    ``(record.data_file, record.id)`` (and the image references, see :meth:`key`).

    The loader fills it (each image decoded once, while it is checked); :meth:`get` decodes on a miss
    (records built in code, such as the procedural world), with the same checks.

    Args:
        max_pixels: bound on width x height per image (see the module docstring).
    """

    def __init__(self, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        if max_pixels < 1:
            raise ValueError(f"ImageStore: max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels = max_pixels
        self._images: dict[tuple[Any, ...], list[Tensor]] = {}

    @staticmethod
    def key(record: HasImages) -> tuple[Any, ...]:
        """(data file, id, the image references): records built in code (no data file, e.g. two benchmark
        readers' questions with the same id) are told apart by their images. Inline bytes enter by length and
        ``hash`` (CPython caches a bytes object's hash, so a repeated lookup does not rehash)."""
        refs = tuple(ref if isinstance(ref, str) else (len(ref), hash(ref)) for ref in record.images)
        return record.data_file, record.id, refs

    def put(self, record: HasImages, images: Sequence[Tensor]) -> None:
        """Keep a record's decoded uint8 images (one per entry of ``record.images``)."""
        if len(images) != len(record.images):
            raise ValueError(f"record {record.id!r}: {len(images)} decoded images for {len(record.images)} refs")
        if any(img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3 for img in images):
            raise ValueError(f"record {record.id!r}: images must be uint8 [3, H, W]")
        self._images[self.key(record)] = list(images)

    def __contains__(self, record: HasImages) -> bool:
        return self.key(record) in self._images

    def __len__(self) -> int:
        return len(self._images)

    @property
    def nbytes(self) -> int:
        """Memory held by the decoded pixels."""
        return sum(img.numel() for imgs in self._images.values() for img in imgs)

    def sizes(self, record: HasImages) -> list[tuple[int, int]]:
        """(height, width) of each of the record's images (decoding them on the first request)."""
        if self.key(record) not in self._images:
            self.get(record)
        return [(int(img.shape[-2]), int(img.shape[-1])) for img in self._images[self.key(record)]]

    def get(self, record: HasImages) -> list[Tensor]:
        """The record's images as float32 ``[3, H, W]`` in ``[0, 1]``, decoding them on the first request."""
        key = self.key(record)
        if key not in self._images:
            base = record_base_dir(record)
            decoded = []
            for k, ref in enumerate(record.images):
                try:
                    decoded.append(decode_ref(ref, base, max_pixels=self.max_pixels))
                except ImageError as e:
                    where = f" of {record.data_file}" if record.data_file else ""
                    raise ImageError(f"record {record.id!r}{where}: field 'images': item {k} {describe(ref)}: "
                                     f"{e}") from None
            self._images[key] = decoded
        return [to_float(img) for img in self._images[key]]
