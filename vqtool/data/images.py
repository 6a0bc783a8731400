"""One image file's bytes → a square RGB uint8 array, robustly, or a `SkipImage` with a reason.

Everything a real folder throws at `prepare` is converted here when it can be: CMYK and YCbCr,
16-bit and 32-bit integer or float greyscale, palettes with or without transparency, greyscale with
alpha, EXIF rotation, the first frame of an animation. Alpha is composited onto the chosen
background. Files that cannot be converted (empty, not an image, truncated, corrupt, or larger than
`max_side` pixels in a side, which guards against decompression bombs) raise SkipImage.
This module does no file I/O, so it runs unchanged in worker processes and in tests.
"""

from __future__ import annotations

import hashlib
import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

CROPS = ("center", "random", "none")

# Skip reasons (short, stable; counted in the manifest and the summary table)
EMPTY = "empty"
NOT_IMAGE = "not-an-image"
TRUNCATED = "truncated"
CORRUPT = "corrupt"
TOO_LARGE = "too-large"
DUPLICATE = "duplicate"
NO_LABEL = "no-label"
UNREADABLE = "unreadable"


class SkipImage(Exception):
    """This file is left out of the dataset; `reason` is one of the short codes above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ConvertSettings:
    size: int = 32
    crop: str = "center"  # center | random | none (keep aspect, pad with the background)
    background: tuple[int, int, int] = (255, 255, 255)
    max_side: int = 10000


def parse_background(text: str) -> tuple[int, int, int]:
    """'white' | 'black' | 'R,G,B' (0-255 each) → an RGB tuple; ValueError with the reason otherwise."""
    named = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128), "grey": (128, 128, 128)}
    key = text.strip().lower()
    if key in named:
        return named[key]
    parts = key.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise ValueError(f"expected white, black or R,G,B with values 0-255, got {text!r}")
    return values  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Decoding


def _open(data: bytes, settings: ConvertSettings) -> Image.Image:
    if len(data) == 0:
        raise SkipImage(EMPTY, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        known = _signature(data)
        if known:
            raise SkipImage(CORRUPT, f"starts like a {known} file but cannot be read (truncated or damaged)") from None
        raise SkipImage(NOT_IMAGE, "not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise SkipImage(TOO_LARGE, str(exc).split(".")[0]) from None
    except (OSError, ValueError, SyntaxError, struct.error) as exc:
        raise SkipImage(_damage_reason(exc), _first_line(exc)) from None
    w, h = img.size
    if max(w, h) > settings.max_side:
        raise SkipImage(TOO_LARGE, f"{w}x{h} exceeds --max-side {settings.max_side}")
    if w < 1 or h < 1:
        raise SkipImage(CORRUPT, f"{w}x{h} has no pixels")
    if img.format == "JPEG":
        # Decode big JPEGs at a reduced DCT scale that is still at least the target size: much faster.
        img.draft(img.mode if img.mode in ("RGB", "L") else None, (settings.size, settings.size))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img) or img
    except Image.DecompressionBombError as exc:
        raise SkipImage(TOO_LARGE, str(exc).split(".")[0]) from None
    except (OSError, ValueError, SyntaxError, struct.error, ZeroDivisionError, IndexError) as exc:
        raise SkipImage(_damage_reason(exc), _first_line(exc)) from None
    return img


_SIGNATURES = {
    b"\x89PNG": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF8": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}


def _signature(data: bytes) -> str:
    for magic, name in _SIGNATURES.items():
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return ""


def _damage_reason(exc: BaseException) -> str:
    text = str(exc).lower()
    return TRUNCATED if ("truncated" in text or "broken data stream" in text) else CORRUPT


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _to_8bit(img: Image.Image) -> Image.Image:
    """Integer/float single-channel modes → 8-bit 'L', scaled by their real range, not clipped."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        a8 = (a.astype(np.uint32) >> 8).astype(np.uint8)
    elif img.mode == "F":
        a = np.nan_to_num(a.astype(np.float64))
        scale = 255.0 if a.max() <= 1.0 else 1.0
        a8 = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    else:  # "I": 32-bit; treat values above 255 as 16-bit data
        a = a.astype(np.int64)
        a8 = (np.clip(a, 0, 65535) >> 8 if a.max() > 255 else np.clip(a, 0, 255)).astype(np.uint8)
    return Image.fromarray(a8, "L")


def normalise_mode(img: Image.Image) -> Image.Image:
    """Any PIL mode → 'RGB' or 'RGBA' (when the image has transparency)."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        img, mode = _to_8bit(img), "L"
    if mode in ("RGBA", "RGB"):
        return img
    if mode in ("LA", "La", "RGBa", "PA"):
        return img.convert("RGBA")
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("L", "1") and "transparency" in img.info:
        return img.convert("RGBA")
    return img.convert("RGB")


def composite(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGBA → RGB over a solid background; RGB passes through."""
    if img.mode != "RGBA":
        return img
    bg = Image.new("RGBA", img.size, (*background, 255))
    return Image.alpha_composite(bg, img).convert("RGB")


def pixel_hash(img: Image.Image) -> str:
    """Identity of the decoded pixels (exact-duplicate detection across formats and file names)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{img.mode}:{img.size[0]}x{img.size[1]}:".encode())
    h.update(img.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Geometry


def fit(img: Image.Image, settings: ConvertSettings, crop_offset: float = 0.5) -> Image.Image:
    """Resize/crop an RGB image to size × size. `crop_offset` in [0, 1] places a square crop along
    the longer side (0.5 = centre; `random` crops draw it per file)."""
    s = settings.size
    w, h = img.size
    resample = Image.Resampling.BICUBIC
    if settings.crop == "none":
        scale = s / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        resized = img.resize((nw, nh), resample, reducing_gap=3.0)
        canvas = Image.new("RGB", (s, s), settings.background)
        canvas.paste(resized, ((s - nw) // 2, (s - nh) // 2))
        return canvas
    side = min(w, h)
    left = round((w - side) * crop_offset)
    top = round((h - side) * crop_offset)
    if side == s and (w, h) == (s, s):
        return img
    return img.resize((s, s), resample, box=(left, top, left + side, top + side), reducing_gap=3.0)


def convert_image(data: bytes, settings: ConvertSettings, crop_offset: float = 0.5) -> tuple[np.ndarray, str]:
    """File bytes → (uint8 (size, size, 3), pixel hash of the decoded full image); SkipImage if unusable."""
    img = _open(data, settings)
    try:
        img = composite(normalise_mode(img), settings.background)
    except (OSError, ValueError) as exc:
        raise SkipImage(CORRUPT, _first_line(exc)) from None
    digest = pixel_hash(img)
    out = fit(img, settings, crop_offset)
    return np.asarray(out, dtype=np.uint8).copy(), digest


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "RGB").save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()
