"""vq.safetensors ↔ VQModel: the only place a VQ model meets the disk.

Tensors: `ema.<param>` (the weights for encoding and decoding), `model.<param>` (the raw weights; an
imported model has only `ema`), and optionally `disc.<param>`, a PatchGAN discriminator to fine-tune from.
Config: {"model": VQConfig fields, "train": the train-vq settings}. Parents: {"dataset": sha256 of the
shards' manifest}. Extra: {"image_size", "latent_shape", "step", "codebook": {"usage", "perplexity",
"val_images"}, "val": {"l1", "psnr"}}.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vqtool.artifacts import Artifact, load_artifact, load_prefixed_weights, save_artifact
from vqtool.config import from_dict
from vqtool.errors import VqtoolError
from vqtool.vq.model import VQConfig, VQModel

WEIGHTS = ("ema", "model")


@dataclass
class LoadedVQ:
    model: VQModel  # in eval mode, on the requested device
    artifact: Artifact
    config: dict[str, Any]  # the artifact's config: {"model": ..., "train": ...}

    @property
    def image_size(self) -> int:
        return int(self.artifact.extra.get("image_size") or self.model.cfg.resolution)

    @property
    def sha256(self) -> str:
        return self.artifact.sha256


def save_vq(
    path: Path,
    cfg: VQConfig,
    ema_state: dict[str, torch.Tensor],
    raw_state: dict[str, torch.Tensor],
    train_config: dict[str, Any],
    parents: dict[str, str],
    extra: dict[str, Any] | None = None,
    discriminator: dict[str, torch.Tensor] | None = None,
) -> str:
    tensors = {f"ema.{k}": v for k, v in ema_state.items()}
    tensors.update({f"model.{k}": v for k, v in raw_state.items()})
    tensors.update({f"disc.{k}": v for k, v in (discriminator or {}).items()})
    config = {"model": dataclasses.asdict(cfg), "train": train_config}
    return save_artifact(path, "vq-model", tensors, config=config, parents=parents, extra=extra)


def config_from_dict(data: dict[str, Any], where: str) -> VQConfig:
    return from_dict(VQConfig, dict(data), where=where)


def load_vq(path: str | Path, device: torch.device | str = "cpu", weights: str = "ema") -> LoadedVQ:
    """Build the VQModel a vq-model artifact describes and load its `ema` (default) or `model` weights."""
    path = Path(path)
    if weights not in WEIGHTS:
        raise VqtoolError(f"--weights must be one of {', '.join(WEIGHTS)} (got {weights!r})")
    if not path.exists():
        raise VqtoolError(f"{path}: no VQ model here; run `vqtool train-vq` first (or pass the right --run)")
    art = load_artifact(path, "vq-model")
    model_cfg = art.config.get("model")
    if not isinstance(model_cfg, dict):
        raise VqtoolError(f"{path}: vq-model artifact without a model config")
    try:
        cfg = config_from_dict(model_cfg, where=f"{path} model config")
        model = VQModel(cfg)
    except ValueError as exc:
        raise VqtoolError(f"{path}: invalid model config ({exc})") from None
    load_prefixed_weights(model, art, weights)
    model.to(device).eval()
    return LoadedVQ(model=model, artifact=art, config=art.config)
