"""DiffAugment (Zhao et al., 2020): differentiable augmentations applied to every discriminator input.

Augmenting real and reconstructed images alike keeps the discriminator from memorising the training
set, while gradients still flow through the augmentation to the generator. Images are in [-1, 1].
Every random draw comes from the `generator` passed in, so training stays reproducible.
"""

from __future__ import annotations

import torch

POLICIES = ("color", "translation", "cutout")


def _rand(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the generator's device (CPU), then moved: a CPU generator cannot fill a CUDA tensor.
    return torch.rand(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.randint(high, shape, generator=generator).to(device)


def color(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    x = x + (_rand((b, 1, 1, 1), generator, x) - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_rand((b, 1, 1, 1), generator, x) * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand((b, 1, 1, 1), generator, x) + 0.5) + mean  # contrast


def translation(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.125) -> torch.Tensor:
    """Shift each image by up to `ratio` of its size, filling with zeros."""
    b, _, h, w = x.shape
    sy, sx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    ty = _randint(2 * sy + 1, (b, 1, 1), generator, x.device) - sy
    tx = _randint(2 * sx + 1, (b, 1, 1), generator, x.device) - sx
    padded = torch.nn.functional.pad(x, (sx, sx, sy, sy))
    rows = torch.arange(h, device=x.device)[None, :, None] + sy + ty  # (B, H, 1)
    cols = torch.arange(w, device=x.device)[None, None, :] + sx + tx  # (B, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, generator: torch.Generator, ratio: float = 0.5) -> torch.Tensor:
    """Zero one square of side `ratio` × size per image, centred anywhere (clipped at the border)."""
    b, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = _randint(h + (1 - ch % 2), (b, 1, 1), generator, x.device) - ch // 2
    cx = _randint(w + (1 - cw % 2), (b, 1, 1), generator, x.device) - cw // 2
    ys = torch.arange(h, device=x.device)[None, :, None]
    xs = torch.arange(w, device=x.device)[None, None, :]
    inside = (ys >= cy) & (ys < cy + ch) & (xs >= cx) & (xs < cx + cw)  # (B, H, W)
    return x * (~inside).to(x.dtype)[:, None]


_OPS = {"color": color, "translation": translation, "cutout": cutout}


def diff_augment(x: torch.Tensor, policy: list[str] | tuple[str, ...], generator: torch.Generator) -> torch.Tensor:
    """Apply the listed augmentations in order; an empty policy returns `x` unchanged."""
    for name in policy:
        if name not in _OPS:
            raise ValueError(f"unknown DiffAugment policy {name!r}; choose from {', '.join(POLICIES)}")
        x = _OPS[name](x, generator)
    return x
