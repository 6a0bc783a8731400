"""The Python API for notebooks: `vqtool.load_vq` and `vqtool.load_prior` (docs/python.md).

Thin handles over the stage code: a `VQ` encodes images to code grids and decodes them back, a `Prior`
gives logits over the codebook and draws token grids. Everything runs without gradients, in eval mode,
on the device the handle was loaded to; inputs are moved there and outputs come back on it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from vqtool.errors import VqtoolError


class VQ:
    """A loaded vq-model artifact. `model` is the underlying vqtool.vq.model.VQModel."""

    def __init__(self, loaded):
        self._loaded = loaded
        self.model = loaded.model
        self.image_size: int = loaded.image_size
        self.codebook_size: int = loaded.model.codebook_size
        self.latent_shape: tuple[int, int] = loaded.model.latent_shape(self.image_size)
        self.path: Path = loaded.artifact.path

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] → code indices (B, h, w) int64."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise VqtoolError(f"encode expects images of shape (B, 3, S, S), got {_shape(images)}")
        if not images.is_floating_point():
            raise VqtoolError("encode expects float images in [-1, 1] (convert uint8 with x / 127.5 - 1)")
        with torch.inference_mode():
            return self.model.encode_to_tokens(images.to(self.device, torch.float32))

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w) → images (B, 3, S, S) clamped to [-1, 1]."""
        if not isinstance(indices, torch.Tensor) or indices.dim() != 3:
            raise VqtoolError(f"decode expects code indices of shape (B, h, w), got {_shape(indices)}")
        with torch.inference_mode():
            try:
                return self.model.decode_tokens(indices.to(self.device))
            except (TypeError, ValueError) as exc:
                raise VqtoolError(str(exc)) from None

    def __repr__(self) -> str:
        h, w = self.latent_shape
        return f"VQ({self.path.name}: {self.image_size} px ↔ {h}×{w} tokens of {self.codebook_size} codes)"


class Prior:
    """A loaded prior-model artifact. `model` is the underlying vqtool.prior.transformer.Transformer."""

    def __init__(self, loaded):
        self._loaded = loaded
        self.model = loaded.model
        self.kind: str = loaded.kind  # "absorbing" or "autoregressive"
        self.codebook_size: int = loaded.cfg.vocab_size
        self.grid: tuple[int, int] = tuple(loaded.cfg.grid)
        self.n_classes: int = loaded.cfg.n_classes
        self.path: Path = loaded.artifact.path

    @property
    def mask_id(self) -> int:
        """The [MASK] token id of an absorbing prior (= codebook_size)."""
        return self._loaded.cfg.mask_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def logits(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Token grids (B, h, w) → logits (B, h, w, K) over the codebook.

        Absorbing: tokens may hold `mask_id`; logits at every position. Autoregressive: position i
        predicts token i from the tokens before it (and the start or class token).
        """
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 3 or tokens.is_floating_point():
            raise VqtoolError(f"logits expects integer token grids (B, h, w), got {_shape(tokens)}")
        if tuple(tokens.shape[1:]) != self.grid:
            raise VqtoolError(f"logits expects the prior's {self.grid[0]}×{self.grid[1]} grid, "
                              f"got {tokens.shape[1]}×{tokens.shape[2]}")
        top = self.mask_id if self.kind == "absorbing" else self.codebook_size - 1
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) > top):
            raise VqtoolError(f"token ids must lie in 0..{top}")
        b = tokens.shape[0]
        labels = self._labels(labels, b)
        with torch.inference_mode():
            out = self.model(tokens.to(self.device).long().reshape(b, -1), labels)
        return out.reshape(b, *self.grid, -1)

    def sample(self, n: int, labels: torch.Tensor | None = None, **settings: Any) -> torch.Tensor:
        """Draw n token grids (n, h, w) int64 on CPU. Keyword settings are those of `vqtool sample`:
        steps, temperature, schedule, top_k, top_p, shape, batch_size, seed, use_cache, ..."""
        from vqtool.prior.sample import SampleSettings, default_labels, sample_tokens

        known = {f.name for f in dataclasses.fields(SampleSettings)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise VqtoolError(f"sample: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        if "shape" in settings and settings["shape"] is not None:
            settings["shape"] = tuple(settings["shape"])
        if labels is None and self.n_classes:
            labels = default_labels(self._loaded, n)
        return sample_tokens(self._loaded, n, SampleSettings(**settings), labels)

    def _labels(self, labels: torch.Tensor | None, b: int) -> torch.Tensor | None:
        if labels is None:
            return None
        if self.n_classes == 0:
            raise VqtoolError("this prior is unconditional; do not pass labels")
        labels = torch.as_tensor(labels).reshape(-1).long()
        if labels.numel() != b or int(labels.min()) < 0 or int(labels.max()) >= self.n_classes:
            raise VqtoolError(f"labels must be {b} class ids in 0..{self.n_classes - 1}")
        return labels.to(self.device)

    def __repr__(self) -> str:
        h, w = self.grid
        return f"Prior({self.path.name}: {self.kind}, {h}×{w} tokens of {self.codebook_size} codes)"


def load_vq(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> VQ:
    """Load a vq-model artifact (trained or imported) for encoding and decoding."""
    from vqtool.device import resolve_device
    from vqtool.vq.store import load_vq as load

    return VQ(load(path, resolve_device(str(device)), weights))


def load_prior(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema") -> Prior:
    """Load a prior-model artifact (trained or imported) for logits and sampling."""
    from vqtool.device import resolve_device
    from vqtool.prior.store import load_prior as load

    path = Path(path)
    if not path.exists():
        raise VqtoolError(f"{path}: no prior here")
    return Prior(load(path, resolve_device(str(device)), weights))


def _shape(x: Any) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
