"""Images as tensors in [-1, 1] ↔ PNG files and PNG grids."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqtool.artifacts import atomic_write_bytes


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) or (3, H, W) floats in [-1, 1] → uint8 array (N, H, W, 3) or (H, W, 3)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def from_uint8(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) → floats in [-1, 1], channels first."""
    t = torch.from_numpy(np.ascontiguousarray(array)).movedim(-1, -3).float()
    return t / 127.5 - 1.0


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: torch.Tensor, path: str | Path) -> None:
    """One image (3, H, W) in [-1, 1] → PNG, written atomically."""
    atomic_write_bytes(path, png_bytes(to_uint8(image)))


def make_grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (N, 3, H, W) into one (3, H', W') image, `nrow` images per row, white gutters."""
    n, c, h, w = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + pad) + pad, ncol * (w + pad) + pad), pad_value)
    for i in range(n):
        r, col = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, y:y + h, x:x + w] = images[i].detach().float().cpu()
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    save_png(make_grid(images, nrow=nrow), path)
