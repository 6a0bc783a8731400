"""Predictions on token grids larger than the training grid, by a mixture of training-sized windows.

Unleashing Transformers, section 3.3: the prior only knows grids of its training size, so on a larger
grid the prediction at a position is the average of the probabilities that every training-sized window
covering it assigns (windows every `stride` tokens, plus the last one flush with each edge so that every
position is covered). The sampler then applies its temperature to that mixture. A larger stride uses
fewer windows: faster, with less context agreement between neighbouring windows.

The result is again a `predict(tokens, positions) -> logits` function, so every unmasking schedule in
vqtool.prior.schedules runs on it unchanged. Its "logits" are log-probabilities of the mixture; where a
single window covers a position they are that window's own logits, so on a grid of training size this
predictor is the plain one, exactly.
"""

from __future__ import annotations

import torch

from vqtool.prior.schedules import Predict


def window_offsets(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis: every `stride`, plus the last one flush with the end."""
    if window > size:
        raise ValueError(f"window {window} is larger than the grid {size}")
    if stride < 1:
        raise ValueError("stride must be at least 1")
    offsets = list(range(0, size - window + 1, stride))
    if offsets[-1] != size - window:
        offsets.append(size - window)
    return offsets


class WindowPredictor:
    """A `Predict` over a (H, W) grid built from `base`, a `Predict` over (h, w) windows."""

    def __init__(self, base: Predict, shape: tuple[int, int], window: tuple[int, int], stride: int = 1):
        self.base = base
        self.shape = (int(shape[0]), int(shape[1]))
        self.window = (int(window[0]), int(window[1]))
        self.offsets = [(i, j) for i in window_offsets(self.shape[0], self.window[0], stride)
                        for j in window_offsets(self.shape[1], self.window[1], stride)]
        self.calls = 0  # window passes made, for benchmarks

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, k = positions.shape
        H, W = self.shape
        h, w = self.window
        grid = tokens.view(B, H, W)
        rows, cols = positions // W, positions % W
        first = None  # logits of the first window that covered each position
        prob_sum = None
        count = torch.zeros((B, k), device=tokens.device)
        for i, j in self.offsets:
            inside = (rows >= i) & (rows < i + h) & (cols >= j) & (cols < j + w)
            if not bool(inside.any()):
                continue
            # Ask the window only for the positions it covers: pack them to the front of each row.
            k_w = int(inside.sum(1).max())
            pick = torch.sort((~inside).to(torch.uint8), dim=1, stable=True).indices[:, :k_w]
            valid = inside.gather(1, pick)
            local = ((rows - i).clamp(0, h - 1) * w + (cols - j).clamp(0, w - 1)).gather(1, pick)
            crop = grid[:, i:i + h, j:j + w].reshape(B, h * w)
            logits = self.base(crop, local).float()
            self.calls += 1
            V = logits.shape[-1]
            if prob_sum is None:
                prob_sum = torch.zeros((B, k, V), device=logits.device)
                first = torch.zeros((B, k, V), device=logits.device)
            index = pick.unsqueeze(-1).expand(B, k_w, V)
            weight = valid.unsqueeze(-1).to(logits.dtype)
            prob_sum.scatter_add_(1, index, logits.softmax(-1) * weight)
            is_first = (valid & (count.gather(1, pick) == 0)).unsqueeze(-1)
            first.scatter_(1, index, torch.where(is_first, logits, first.gather(1, index)))
            count.scatter_add_(1, pick, valid.to(count.dtype))
        mixture = (prob_sum / count.clamp(min=1).unsqueeze(-1)).log()
        return torch.where((count == 1).unsqueeze(-1), first, mixture)
