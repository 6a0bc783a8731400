"""prior.safetensors ↔ Transformer: the only place a prior model meets the disk.

Tensors: `ema.<param>` (the weights used for sampling and evaluation) and `model.<param>` (the raw
weights). Config: {"prior": "absorbing" | "autoregressive", "model": TransformerConfig fields,
"objective": the objective's settings, "latent_shape": [H, W], "codebook_size": K}.
Parents: {"latents": sha256, "vq": sha256 of the VQ that made those latents}.
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
from vqtool.prior.transformer import Transformer, TransformerConfig

PRIOR_KINDS = ("absorbing", "autoregressive")
LEGACY_GELU = "tanh"  # the GELU of records made before it was a setting: vqtool's only one then


@dataclass
class LoadedPrior:
    model: Transformer
    kind: str  # "absorbing" or "autoregressive"
    objective: dict[str, Any]
    artifact: Artifact

    @property
    def cfg(self) -> TransformerConfig:
        return self.model.cfg


def save_prior(
    path: Path,
    kind: str,
    model_cfg: TransformerConfig,
    objective: dict[str, Any],
    ema_state: dict[str, torch.Tensor],
    raw_state: dict[str, torch.Tensor],
    parents: dict[str, str],
    extra: dict[str, Any] | None = None,
) -> str:
    if kind not in PRIOR_KINDS:
        raise ValueError(f"unknown prior kind {kind!r}")
    tensors = {f"ema.{k}": v for k, v in ema_state.items()}
    tensors.update({f"model.{k}": v for k, v in raw_state.items()})
    config = {
        "prior": kind,
        "model": dataclasses.asdict(model_cfg),
        "objective": objective,
        "latent_shape": list(model_cfg.grid),
        "codebook_size": model_cfg.vocab_size,
    }
    return save_artifact(path, "prior-model", tensors, config=config, parents=parents, extra=extra)


def with_legacy_settings(record: dict[str, Any]) -> dict[str, Any]:
    """A `model` record in today's terms: settings added since it was written, at the value they had."""
    return {"gelu": LEGACY_GELU, **record}


def model_config_from_record(data: Any, where: str) -> TransformerConfig:
    """The TransformerConfig an artifact's `model` record describes."""
    if not isinstance(data, dict) or "grid" not in data:
        raise VqtoolError(f"{where}: missing or incomplete")
    return from_dict(TransformerConfig, {**with_legacy_settings(data), "grid": tuple(data["grid"])}, where=where)


def load_prior(path: Path, device: torch.device | str = "cpu", weights: str = "ema") -> LoadedPrior:
    """Build the transformer a prior artifact describes and load its `ema` or `model` weights."""
    art = load_artifact(path, "prior-model")
    kind = art.config.get("prior")
    if kind not in PRIOR_KINDS:
        raise VqtoolError(f"{path}: unknown prior kind {kind!r}")
    cfg = model_config_from_record(art.config.get("model"), f"{path} model config")
    model = Transformer(cfg)
    load_prefixed_weights(model, art, weights)
    model.to(device).eval()
    return LoadedPrior(model=model, kind=kind, objective=art.config.get("objective", {}), artifact=art)
