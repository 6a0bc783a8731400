"""The built-in procedural dataset: coloured geometric shapes on textured backgrounds.

Image `index` of seed `seed` is a pure function of (seed, index, size): it draws from its own
explicitly seeded generator, so any subset can be rendered in any order or process and the dataset
is identical everywhere. The label is the shape class; classes are balanced (class = index mod 8).
Shapes vary in size, position, rotation, colour, fill (flat or shaded), outline and shadow;
backgrounds are gradients, stripes, checks, dots or smooth noise, so a VQ model has texture and
edges to learn and a prior has a class-dependent layout to learn.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "hexagon", "heart")


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index), 0x5A4E])


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


# --------------------------------------------------------------------------------------------------
# Outlines in unit coordinates (radius about 1), before rotation and scaling


def _regular(n: int, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], 1)


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)],
        dtype=np.float64,
    )


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)
    return pts / 16.5


_OUTLINES = {
    "square": _regular(4, math.pi / 4) * 1.0,
    "triangle": _regular(3, -math.pi / 2) * 1.1,
    "hexagon": _regular(6),
    "star": _star() * 1.15,
    "cross": _cross(),
    "heart": _heart() * 1.05,
}


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float, ring: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of the shape, drawn supersampled then box-filtered."""
    ss = 4 if size <= 128 else 2
    canvas = Image.new("L", (size * ss, size * ss), 0)
    draw = ImageDraw.Draw(canvas)
    X, Y, R = cx * ss, cy * ss, r * ss
    if shape in ("circle", "ring"):
        draw.ellipse((X - R, Y - R, X + R, Y + R), fill=255)
        if shape == "ring":
            ri = R * ring
            draw.ellipse((X - ri, Y - ri, X + ri, Y + ri), fill=0)
    else:
        pts = _OUTLINES[shape]
        c, s = math.cos(angle), math.sin(angle)
        rotated = pts @ np.array([[c, s], [-s, c]])
        draw.polygon([(X + R * px, Y + R * py) for px, py in rotated], fill=255)
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# --------------------------------------------------------------------------------------------------
# Backgrounds


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    low = (rng.random((cells, cells)) * 255).astype(np.uint8)
    up = Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int, shape_hue: float) -> np.ndarray:
    # Background hues keep away from the shape's hue so the object stays visible.
    hue = shape_hue + rng.uniform(0.25, 0.75)
    sat = rng.uniform(0.1, 0.6)
    val = rng.uniform(0.25, 0.95)
    a = _hsv(hue, sat, val)
    val_b = float(np.clip(val + rng.uniform(-0.35, 0.35), 0.1, 1.0))
    b = _hsv(hue + rng.uniform(-0.12, 0.12), min(1.0, sat * rng.uniform(0.5, 1.2)), val_b)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(theta) + yy * math.sin(theta)
    kind = rng.integers(5)
    if kind == 0:  # linear gradient
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    elif kind == 1:  # soft stripes
        period = rng.uniform(0.12, 0.35)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * u / period)
    elif kind == 2:  # checks
        cells = int(rng.integers(3, 7))
        v = xx * math.cos(theta + math.pi / 2) + yy * math.sin(theta + math.pi / 2)
        t = ((np.floor(u * cells) + np.floor(v * cells)) % 2).astype(np.float32)
        t = 0.25 + 0.5 * t
    elif kind == 3:  # dots
        cells = rng.uniform(4, 8)
        fx, fy = (xx * cells) % 1 - 0.5, (yy * cells) % 1 - 0.5
        t = (fx**2 + fy**2 < rng.uniform(0.04, 0.1)).astype(np.float32)
    else:  # smooth noise
        t = _smooth_noise(rng, size, int(rng.integers(3, 7)))
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    grain = rng.normal(0, rng.uniform(0.0, 0.04), (size, size, 1)).astype(np.float32)
    return img + grain


# --------------------------------------------------------------------------------------------------


def render_shape(index: int, size: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Image `index` of the shapes dataset: uint8 (size, size, 3) and its class index."""
    rng = _rng(seed, index)
    label = index % len(SHAPES)
    shape = SHAPES[label]
    hue = rng.random()
    r = size * rng.uniform(0.22, 0.36)
    margin = r * 1.0
    cx = rng.uniform(margin, size - margin)
    cy = rng.uniform(margin, size - margin)
    angle = rng.uniform(0, 2 * math.pi)
    mask = _shape_mask(shape, size, cx, cy, r, angle, ring=rng.uniform(0.45, 0.65))

    img = _background(rng, size, hue)
    if rng.random() < 0.6:  # a soft drop shadow
        dx, dy = (int(v) for v in rng.integers(1, max(2, size // 16) + 1, 2))
        shadow = np.roll(np.roll(mask, dy, 0), dx, 1)
        img = img * (1 - 0.45 * shadow[..., None])
    color = _hsv(hue, rng.uniform(0.55, 1.0), rng.uniform(0.65, 1.0))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    if rng.random() < 0.5:  # shaded fill: lighter towards a random light direction
        phi = rng.uniform(0, 2 * math.pi)
        t = ((xx - cx) * math.cos(phi) + (yy - cy) * math.sin(phi)) / (2 * r) + 0.5
        shade = 1.25 - 0.5 * np.clip(t, 0, 1)
        fill = np.clip(color[None, None] * shade[..., None], 0, 1)
    else:
        fill = np.broadcast_to(color, (size, size, 3))
    img = img * (1 - mask[..., None]) + fill * mask[..., None]
    if rng.random() < 0.4:  # a dark outline: coverage of the shape's rim
        edge = np.clip(mask * (1 - mask) * 4, 0, 1)
        img = img * (1 - 0.7 * edge[..., None])
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out, label


SYNTHETIC = {"shapes": (render_shape, SHAPES)}


def synthetic_classes(name: str) -> list[str]:
    return list(SYNTHETIC[name][1])
