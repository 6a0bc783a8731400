"""samples.safetensors: token grids drawn from a prior, with labels, seed, settings and provenance.

Tensors: `tokens` (N, H, W) in the smallest integer dtype that holds the codebook, and `labels` (N,)
int64 when the prior is class-conditional. Config: the sampling settings (seed included) and
{"n", "shape"}. Parents: {"prior": sha256, "vq": sha256}. `sample` and `inpaint` write this kind;
`eval` reads it to score generated images without sampling again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtool.artifacts import Artifact, load_artifact, save_artifact
from vqtool.errors import VqtoolError
from vqtool.latents import token_dtype


@dataclass
class Samples:
    tokens: torch.Tensor  # (N, H, W) int64
    labels: torch.Tensor | None  # (N,) int64
    settings: dict[str, Any]
    artifact: Artifact


def save_samples(
    path: Path,
    tokens: torch.Tensor,
    labels: torch.Tensor | None,
    settings: dict[str, Any],
    parents: dict[str, str],
    codebook_size: int | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """Write token grids (N, H, W) and their labels; returns the file's sha256."""
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (N, H, W), got shape {tuple(tokens.shape)}")
    if labels is not None and labels.shape != (tokens.shape[0],):
        raise ValueError(f"labels must be ({tokens.shape[0]},), got shape {tuple(labels.shape)}")
    if codebook_size is None:
        codebook_size = int(tokens.max()) + 1 if tokens.numel() else 1
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= codebook_size):
        raise ValueError(f"tokens must lie in [0, {codebook_size})")
    tensors = {"tokens": tokens.to(token_dtype(codebook_size))}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64)
    config = {**settings, "n": int(tokens.shape[0]), "shape": list(tokens.shape[1:]),
              "codebook_size": codebook_size}
    return save_artifact(path, "samples", tensors, config=config, parents=parents, extra=extra)


def load_samples(path: Path) -> Samples:
    art = load_artifact(path, "samples")
    tokens = art.tensors.get("tokens")
    if tokens is None or tokens.dim() != 3:
        raise VqtoolError(f"{path}: samples artifact without a (N, H, W) `tokens` tensor")
    labels = art.tensors.get("labels")
    if labels is not None and labels.shape != (tokens.shape[0],):
        raise VqtoolError(f"{path}: `labels` has shape {tuple(labels.shape)}, expected ({tokens.shape[0]},)")
    art.tensors = {}
    return Samples(tokens=tokens.long(), labels=labels, settings=dict(art.config), artifact=art)
