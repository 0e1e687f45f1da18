"""Every image mode decodes as a viewer shows it (issue 22: a 16-bit PNG became all white, black strokes on a
transparent background all black). Each case builds a picture whose look is known by hand and compares."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diva_lightning.data.images import MODES, ImageError, decode_bytes, to_rgb


def encode(img: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    """decode_bytes as [H, W, 3] for comparison with hand-built pictures."""
    return decode_bytes(data).numpy().transpose(1, 2, 0)


def grey3(level: np.ndarray) -> np.ndarray:
    return np.repeat(level.astype(np.uint8)[:, :, None], 3, axis=2)


def test_16_bit_grey_png_is_scaled_not_clipped() -> None:
    raw = np.array([[0, 257, 32896], [65535, 1000, 50000]], dtype=np.uint16)
    data = encode(Image.fromarray(raw))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert np.array_equal(decoded(data), grey3(np.rint(raw / 257.0)))  # 0, 1, 128 / 255, 4, 195


def test_strokes_on_a_transparent_background_stay_visible() -> None:
    """LA: black (L=0) everywhere, opaque only on the stroke: a viewer shows a black stroke on white."""
    alpha = np.zeros((4, 4), np.uint8)
    alpha[1, :] = 255
    la = Image.merge("LA", [Image.new("L", (4, 4), 0), Image.fromarray(alpha)])
    expected = grey3(np.where(alpha == 255, 0, 255))
    assert np.array_equal(decoded(encode(la)), expected)


def test_rgba_is_composited_on_white() -> None:
    px = np.array([[[255, 0, 0, 255], [255, 0, 0, 128], [0, 0, 255, 0]]], np.uint8)
    out = decoded(encode(Image.fromarray(px, "RGBA")))
    a = px[..., 3:4] / 255.0
    expected = np.rint(px[..., :3] * a + 255 * (1 - a))
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out[0, 2].tolist() == [255, 255, 255]  # fully transparent: the background


def test_palette_with_and_without_a_transparent_entry() -> None:
    p = Image.new("P", (3, 1))
    p.putpalette([255, 0, 0, 0, 128, 0, 10, 20, 30] + [0] * (253 * 3))
    p.putdata([0, 1, 2])
    assert decoded(encode(p)).tolist() == [[[255, 0, 0], [0, 128, 0], [10, 20, 30]]]
    data = encode(p, transparency=2)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert decoded(data).tolist() == [[[255, 0, 0], [0, 128, 0], [255, 255, 255]]]
    gif = encode(p, "GIF", transparency=0)
    assert decoded(gif).tolist() == [[[255, 255, 255], [0, 128, 0], [10, 20, 30]]]


def test_grey_and_bilevel() -> None:
    level = np.array([[0, 100, 255]], np.uint8)
    assert np.array_equal(decoded(encode(Image.fromarray(level, "L"))), grey3(level))
    bits = Image.fromarray(np.array([[True, False, True]]))
    data = encode(bits)
    assert Image.open(io.BytesIO(data)).mode == "1"
    assert np.array_equal(decoded(data), grey3(np.array([[255, 0, 255]])))
    assert np.array_equal(decoded(encode(bits, "BMP")), grey3(np.array([[255, 0, 255]])))


def test_cmyk_jpeg_and_ycbcr() -> None:
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    data = encode(cmyk, "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert np.abs(decoded(data).astype(int) - [255, 0, 0]).max() <= 3
    rgb = Image.fromarray(np.array([[[200, 30, 60], [0, 0, 0]]], np.uint8))
    assert np.abs(to_rgb(rgb.convert("YCbCr")).astype(int) - np.asarray(rgb)).max() <= 2


@pytest.mark.parametrize("mode", ["RGBa", "La", "PA", "RGBX"])
def test_in_memory_modes_pillow_writes_to_no_format_we_read(mode: str) -> None:
    """Modes a decoder could hand over (premultiplied alpha, palette+alpha, padded RGB), built with Pillow."""
    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [0, 0, 255, 0], [0, 255, 0, 255]]], np.uint8), "RGBA")
    expected = {"RGBa": [[255, 0, 0], [255, 255, 255], [0, 255, 0]],
                "La": [[76, 76, 76], [255, 255, 255], [150, 150, 150]],  # ITU-R 601 luma of red / green
                "PA": [[255, 0, 0], [255, 255, 255], [0, 255, 0]],
                "RGBX": [[255, 0, 0], [0, 0, 255], [0, 255, 0]]}[mode]
    if mode == "La":
        img = rgba.convert("LA").convert("La")
    elif mode == "PA":
        pa = rgba.convert("PA")
        img = pa
    else:
        img = rgba.convert(mode)
    assert img.mode == mode
    assert np.abs(to_rgb(img).astype(int) - np.array([expected])).max() <= 1


def test_wide_integer_and_float_grey_are_scaled_or_refused() -> None:
    i32 = Image.fromarray(np.array([[0, 65535, 32896]], np.int32), "I")
    assert to_rgb(i32).tolist() == [[[0] * 3, [255] * 3, [128] * 3]]
    f32 = Image.fromarray(np.array([[0.0, 1.0, 0.5]], np.float32), "F")
    assert to_rgb(f32).tolist() == [[[0] * 3, [255] * 3, [128] * 3]]
    with pytest.raises(ImageError, match=r"F image with values from 0.0 to 3.0: outside 0.0..1.0"):
        to_rgb(Image.fromarray(np.array([[0.0, 3.0]], np.float32), "F"))
    with pytest.raises(ImageError, match=r"I image with values from -5.0 to 0.0: outside 0..65535"):
        to_rgb(Image.fromarray(np.array([[-5, 0]], np.int32), "I"))


def test_exif_orientation_is_applied() -> None:
    """Orientation 6 ("rotate 90 CW to display"): a 2x3 picture stored sideways shows as 3x2."""
    stored = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(Image.fromarray(stored, "L"), exif=exif.tobytes())
    assert np.array_equal(decoded(data), grey3(np.rot90(stored, k=-1)))


def test_other_modes_are_refused_naming_the_mode() -> None:
    with pytest.raises(ImageError, match=r"image mode 'HSV' is not supported; accepted modes: RGB, RGBX, L"):
        to_rgb(Image.new("HSV", (2, 2)))
    assert {"I;16", "F", "CMYK", "LA", "PA", "P", "1"} <= set(MODES)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_a_colour_key_is_transparent_on_white(mode: str) -> None:
    """PNG's tRNS chunk on an RGB or grey image marks one colour transparent: a viewer shows the background there."""
    key = (0, 0, 0) if mode == "RGB" else 0
    img = Image.new(mode, (2, 2), key)
    img.putpixel((0, 0), (200, 10, 10) if mode == "RGB" else 90)
    buf = io.BytesIO()
    img.save(buf, "PNG", transparency=key)
    rgb = decode_bytes(buf.getvalue())
    assert rgb[:, 1, 1].tolist() == [255, 255, 255]  # the keyed colour
    assert rgb[:, 0, 0].tolist() == ([200, 10, 10] if mode == "RGB" else [90, 90, 90])
