"""latents.safetensors: the token grids of a dataset under one VQ, with labels and provenance.

Tensors: `train.tokens` and `val.tokens` (N, H, W) in the smallest integer dtype that holds the
codebook, and `train.labels` / `val.labels` (N,) int64 when the dataset is labelled.
Config: {"codebook_size": K, "latent_shape": [H, W], "image_size": S}. Parents: {"vq": sha256,
"dataset": sha256 of the shards' manifest.json}. Extra: {"classes": [...]}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from vqtool.artifacts import Artifact, load_artifact, save_artifact
from vqtool.errors import VqtoolError


def token_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype that holds every code index."""
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32


@dataclass
class Split:
    tokens: torch.Tensor  # (N, H, W), stored dtype; use .long() before indexing embeddings
    labels: torch.Tensor | None = None  # (N,) int64


@dataclass
class Latents:
    splits: dict[str, Split]
    codebook_size: int
    latent_shape: tuple[int, int]
    image_size: int
    classes: list[str] = field(default_factory=list)
    artifact: Artifact | None = None

    @property
    def n_classes(self) -> int:
        return len(self.classes)


def save_latents(path: Path, latents: Latents, parents: dict[str, str], config_extra: dict | None = None) -> str:
    tensors: dict[str, torch.Tensor] = {}
    dtype = token_dtype(latents.codebook_size)
    for name, split in latents.splits.items():
        if split.tokens.numel() and int(split.tokens.max()) >= latents.codebook_size:
            raise ValueError(f"{name} tokens exceed the codebook size {latents.codebook_size}")
        tensors[f"{name}.tokens"] = split.tokens.to(dtype)
        if split.labels is not None:
            tensors[f"{name}.labels"] = split.labels.to(torch.int64)
    config = {
        "codebook_size": latents.codebook_size,
        "latent_shape": list(latents.latent_shape),
        "image_size": latents.image_size,
        **(config_extra or {}),
    }
    return save_artifact(path, "latents", tensors, config=config, parents=parents,
                         extra={"classes": latents.classes})


def load_latents(path: Path) -> Latents:
    art = load_artifact(path, "latents")
    try:
        codebook_size = int(art.config["codebook_size"])
        shape = tuple(int(s) for s in art.config["latent_shape"])
    except (KeyError, TypeError, ValueError):
        raise VqtoolError(f"{path}: latents artifact without codebook_size/latent_shape in its config") from None
    splits = {}
    for name in ("train", "val"):
        if f"{name}.tokens" not in art.tensors:
            continue
        tokens = art.tensors[f"{name}.tokens"]
        if tuple(tokens.shape[1:]) != shape:
            raise VqtoolError(f"{path}: {name}.tokens has shape {tuple(tokens.shape)}, config says {shape}")
        splits[name] = Split(tokens=tokens, labels=art.tensors.get(f"{name}.labels"))
    if "train" not in splits:
        raise VqtoolError(f"{path}: no train tokens")
    latents = Latents(splits=splits, codebook_size=codebook_size, latent_shape=shape,
                      image_size=int(art.config.get("image_size", 0)),
                      classes=list(art.extra.get("classes", [])), artifact=art)
    art.tensors = {}
    return latents
