"""One file → one square RGB array: every bad-input case is converted or skipped with its reason."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vqtool.data import images
from vqtool.data.images import ConvertSettings, SkipImage, convert_image, parse_background


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit RGB): grey (H, W) or RGB (H, W, 3)."""
    h, w = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


SAME = ConvertSettings(size=8)  # the inputs below are 8×8 unless stated, so no resampling happens


def skip_reason(data: bytes, settings: ConvertSettings = SAME) -> str:
    with pytest.raises(SkipImage) as info:
        convert_image(data, settings)
    return info.value.reason


# --------------------------------------------------------------------------------------------------
# Skipped


def test_empty_file_is_skipped():
    assert skip_reason(b"") == images.EMPTY


def test_text_file_named_jpg_is_not_an_image():
    assert skip_reason(b"this is a text file, not a JPEG\n" * 3) == images.NOT_IMAGE


def test_truncated_png_and_jpeg_are_skipped():
    png = encode(Image.fromarray(noise(32, 32)), "PNG")
    assert skip_reason(png[: len(png) // 2]) == images.TRUNCATED
    for quality in (75, 90):  # cut in the entropy-coded data, or inside the header tables
        jpg = encode(Image.fromarray(noise(32, 32)), "JPEG", quality=quality)
        assert skip_reason(jpg[: len(jpg) // 2]) == images.TRUNCATED
        assert skip_reason(jpg[:100]) == images.TRUNCATED
    # cut inside the header: recognisably a PNG, but unreadable
    assert skip_reason(png[:40]) == images.CORRUPT


def test_huge_image_is_skipped_before_decoding_and_accepted_with_a_higher_limit():
    wide = encode(Image.new("RGB", (10001, 1), (10, 20, 30)), "PNG")
    assert skip_reason(wide) == images.TOO_LARGE
    out, _ = convert_image(wide, ConvertSettings(size=8, max_side=20000))
    assert out.shape == (8, 8, 3)
    assert (out == [10, 20, 30]).all()


# --------------------------------------------------------------------------------------------------
# Converted


def test_rgb_png_passes_through_exactly():
    a = noise(8, 8)
    out, _ = convert_image(encode(Image.fromarray(a), "PNG"), SAME)
    assert out.dtype == np.uint8 and out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out, a)


def test_cmyk_jpeg_is_converted_to_rgb():
    cmyk = Image.new("CMYK", (8, 8), (255, 0, 0, 0))  # pure cyan
    out, _ = convert_image(encode(cmyk, "JPEG", quality=95), SAME)
    assert out.shape == (8, 8, 3)
    assert np.abs(out.astype(int) - [0, 255, 255]).max() <= 3


def test_16bit_grey_png_is_scaled_not_clipped():
    grey = np.array([[0, 256, 32768, 65535] * 2] * 8, dtype=np.uint16)
    out, _ = convert_image(png16(grey), SAME)
    np.testing.assert_array_equal(out[0, :4, 0], [0, 1, 128, 255])
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_16bit_rgb_png_keeps_the_high_byte():
    a = np.random.default_rng(1).integers(0, 65536, (8, 8, 3)).astype(np.uint16)
    out, _ = convert_image(png16(a), SAME)
    np.testing.assert_array_equal(out, (a >> 8).astype(np.uint8))


def test_float_tiff_in_unit_range_is_scaled():
    f = np.full((8, 8), 0.5, dtype=np.float32)
    out, _ = convert_image(encode(Image.fromarray(f, "F"), "TIFF"), SAME)
    assert (out == 128).all()


def test_palette_png_with_transparency_is_composited_onto_the_background():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([255, 0, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    p.paste(1, (0, 0, 4, 8))  # left half index 1 (blue), right half index 0 (red, made transparent)
    data = encode(p, "PNG", transparency=0)
    out, _ = convert_image(data, ConvertSettings(size=8, background=(0, 255, 0)))
    assert (out[:, :4] == [0, 0, 255]).all()
    assert (out[:, 4:] == [0, 255, 0]).all()


def test_palette_without_transparency_becomes_rgb():
    p = Image.new("P", (8, 8), 3)
    p.putpalette([0, 0, 0] * 3 + [12, 34, 56] + [0, 0, 0] * 252)
    out, _ = convert_image(encode(p, "PNG"), SAME)
    assert (out == [12, 34, 56]).all()


def test_grayscale_becomes_three_equal_channels():
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out, _ = convert_image(encode(Image.fromarray(g, "L"), "PNG"), SAME)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)


def test_la_alpha_is_composited():
    la = Image.new("LA", (8, 8), (200, 0))  # fully transparent
    la.paste((100, 255), (0, 0, 8, 4))  # top half opaque grey 100
    out, _ = convert_image(encode(la, "PNG"), ConvertSettings(size=8, background=(0, 0, 0)))
    assert (out[:4] == 100).all()
    assert (out[4:] == 0).all()


def test_rgba_half_alpha_blends_with_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    out, _ = convert_image(encode(rgba, "PNG"), ConvertSettings(size=8, background=(255, 255, 255)))
    assert np.abs(out.astype(int) - 127).max() <= 1


@pytest.mark.parametrize("fmt", ["BMP", "GIF", "TIFF", "WEBP"])
def test_other_formats_decode(fmt):
    img = Image.new("RGB", (8, 8), (255, 0, 0))
    kw = {"lossless": True} if fmt == "WEBP" else {}
    out, _ = convert_image(encode(img, fmt, **kw), SAME)
    assert out.shape == (8, 8, 3)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 2


def test_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out, _ = convert_image(buf.getvalue(), SAME)
    assert np.abs(out.astype(int) - [255, 0, 0]).max() <= 2


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (16, 8), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 8))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display: the white half ends on top
    out, _ = convert_image(encode(img, "PNG", exif=exif), ConvertSettings(size=8, crop="none", background=(9, 9, 9)))
    assert out[0, 4].min() > 200 and out[7, 4].max() < 50


# --------------------------------------------------------------------------------------------------
# Geometry and hashing


def test_center_crop_takes_the_middle_square():
    a = np.zeros((8, 24, 3), np.uint8)
    a[:, 8:16] = 255
    out, _ = convert_image(encode(Image.fromarray(a), "PNG"), ConvertSettings(size=8, crop="center"))
    assert (out == 255).all()


def test_crop_offset_moves_the_square_along_the_long_side():
    a = np.zeros((8, 24, 3), np.uint8)
    a[:, :8] = 255
    data = encode(Image.fromarray(a), "PNG")
    left, _ = convert_image(data, ConvertSettings(size=8, crop="random"), crop_offset=0.0)
    right, _ = convert_image(data, ConvertSettings(size=8, crop="random"), crop_offset=1.0)
    assert (left == 255).all() and (right == 0).all()


def test_crop_none_keeps_aspect_and_pads_with_background():
    a = np.full((8, 16, 3), 200, np.uint8)
    settings = ConvertSettings(size=8, crop="none", background=(1, 2, 3))
    out, _ = convert_image(encode(Image.fromarray(a), "PNG"), settings)
    assert out.shape == (8, 8, 3)
    assert (out[:2] == [1, 2, 3]).all() and (out[6:] == [1, 2, 3]).all()
    assert (out[2:6] == 200).all()


@pytest.mark.parametrize("size", [16, 32])
def test_resizes_to_the_requested_size(size):
    out, _ = convert_image(encode(Image.fromarray(noise(50, 70)), "JPEG"), ConvertSettings(size=size))
    assert out.shape == (size, size, 3)


def test_pixel_hash_identifies_identical_pixels_across_formats():
    a = noise(8, 8, seed=3)
    _, h_png = convert_image(encode(Image.fromarray(a), "PNG"), SAME)
    _, h_bmp = convert_image(encode(Image.fromarray(a), "BMP"), SAME)
    b = a.copy()
    b[0, 0, 0] ^= 1
    _, h_other = convert_image(encode(Image.fromarray(b), "PNG"), SAME)
    assert h_png == h_bmp != h_other


def test_parse_background():
    assert parse_background("white") == (255, 255, 255)
    assert parse_background("black") == (0, 0, 0)
    assert parse_background(" 10, 20,30 ") == (10, 20, 30)
    for bad in ["purple", "1,2", "1,2,300", "a,b,c"]:
        with pytest.raises(ValueError):
            parse_background(bad)
