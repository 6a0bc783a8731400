"""The prior's negative log-likelihood on train and val latents, and the gap between them.

Bits per token come from `vqtool.prior.likelihood.dataset_nll`: exact for the autoregressive prior, the
ELBO (an upper bound) for the absorbing prior. Bits per dimension spread an image's total bits over its
pixels' colour values (3·S·S), which makes models with different token grids comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vqtool.latents import Latents


@dataclass
class NllResult:
    bound: str  # "exact" or "elbo"
    per_image: dict[str, torch.Tensor] = field(default_factory=dict)  # split → (N,) bits/token
    tokens_per_image: int = 0
    dims_per_image: int = 0

    def bpt(self, split: str) -> float | None:
        return float(self.per_image[split].mean()) if split in self.per_image else None

    def bpd(self, split: str) -> float | None:
        bpt = self.bpt(split)
        if bpt is None or not self.dims_per_image:
            return None  # the image size is unknown
        return bpt * self.tokens_per_image / self.dims_per_image

    def metrics(self) -> dict[str, float | None]:
        out = {f"nll_{s}_{u}": getattr(self, u)(s) for s in ("train", "val") for u in ("bpt", "bpd")}
        has_both = out["nll_train_bpt"] is not None and out["nll_val_bpt"] is not None
        out["nll_gap_bpt"] = out["nll_val_bpt"] - out["nll_train_bpt"] if has_both else None
        out["nll_gap_bpd"] = out["nll_val_bpd"] - out["nll_train_bpd"] if has_both else None
        return out


def bits_per_dim(bits_per_token: float, latent_shape: tuple[int, int], image_size: int) -> float:
    h, w = latent_shape
    return bits_per_token * h * w / (3 * image_size * image_size)


def likelihood(
    prior,
    latents: Latents,
    n: int | None,
    batch_size: int,
    seed: int,
    progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
    nll_samples: int | None = None,
) -> NllResult:
    """Per-image NLL of the first `n` images (all when None or more) of each latents split.

    Each split starts from a generator seeded with `seed`, so its numbers do not depend on the other split.
    """
    from vqtool.prior.likelihood import dataset_nll

    h, w = latents.latent_shape
    size = latents.image_size or 0
    result = NllResult(bound="exact" if prior.kind == "autoregressive" else "elbo",
                       tokens_per_image=h * w, dims_per_image=3 * size * size)
    device = next(prior.model.parameters()).device
    for name in ("train", "val"):
        split = latents.splits.get(name)
        if split is None or split.tokens.shape[0] == 0:
            continue
        count = split.tokens.shape[0] if n is None else min(n, split.tokens.shape[0])
        tokens = split.tokens[:count].long()
        labels = None if split.labels is None or prior.cfg.n_classes == 0 else split.labels[:count]
        generator = torch.Generator(device=device).manual_seed(seed)
        callback = progress(name) if progress is not None else None
        result.per_image[name] = dataset_nll(prior, tokens, labels, batch_size, generator, callback,
                                          nll_samples).double().cpu()
    return result
