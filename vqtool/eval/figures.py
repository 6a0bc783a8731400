"""The neighbours figure: each sample beside its nearest training images, with the distances written under them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from vqtool.grids import to_uint8

MIN_TILE = 64  # tiles are enlarged (nearest neighbour) to at least this side so the text fits
CAPTION = 14
PAD = 4
GAP = 12  # extra space between the sample column and its neighbours


def neighbour_grid(samples: torch.Tensor, neighbours: torch.Tensor, distances: torch.Tensor,
                   flagged: set[int] | None = None, train_indices: torch.Tensor | None = None) -> Image.Image:
    """samples (S, 3, H, W), neighbours (S, k, 3, H, W), distances (S, k) → one RGB image.

    Under a sample: its number (red with a `!` when flagged); under a neighbour: its LPIPS distance and,
    when given, its training index.
    """
    flagged = flagged or set()
    s, k = distances.shape
    h, w = samples.shape[-2:]
    scale = max(1, -(-MIN_TILE // min(h, w)))
    th, tw = h * scale, w * scale
    cell_h = th + CAPTION + PAD
    width = PAD + (tw + PAD) * (k + 1) + GAP
    height = PAD + cell_h * s
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()

    def paste(image: torch.Tensor, x: int, y: int) -> None:
        tile = Image.fromarray(np.ascontiguousarray(to_uint8(image))).resize((tw, th), Image.Resampling.NEAREST)
        canvas.paste(tile, (x, y))

    for row in range(s):
        y = PAD + row * cell_h
        paste(samples[row], PAD, y)
        mark = row in flagged
        draw.text((PAD, y + th + 1), f"#{row}{' !' if mark else ''}", fill=(200, 0, 0) if mark else (0, 0, 0),
                  font=font)
        for col in range(k):
            x = PAD + GAP + (tw + PAD) * (col + 1)
            paste(neighbours[row, col], x, y)
            text = f"{float(distances[row, col]):.3f}"
            if train_indices is not None and tw >= 96:
                text += f" @{int(train_indices[row, col])}"
            draw.text((x, y + th + 1), text, fill=(0, 0, 0), font=font)
    return canvas
