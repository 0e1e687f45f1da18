"""Generators of bad (and good) inputs for the fault-corpus tests: nothing binary is committed."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24), seed: int = 0) -> bytes:
    """A small noisy RGB image (noise: a truncated half cannot happen to decode by luck)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format=fmt)
    return out.getvalue()


def solid_png(color: tuple[int, int, int], size: tuple[int, int] = (8, 8)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, an IHDR claiming ``width x height`` and IEND: what a decompression bomb shows first."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def garbage(n: int = 600, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]
