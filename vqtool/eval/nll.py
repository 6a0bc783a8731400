"""The prior's negative log-likelihood on train and val latents, and the gap between them.

Bits per token come from `vqtool.prior.likelihood.dataset_nll`: exact for the autoregressive prior, the
ELBO (an upper bound) for the absorbing prior. Bits per dimension spread an image's total bits over its
pixels' colour values (3·S·S), which makes models with different token grids comparable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vqtool.latents import Latents


@dataclass
class SplitNll:
    """One split's per-image bits per token and the Monte-Carlo variance of each image's estimate."""

    bits: torch.Tensor  # (N,) float64
    variance: torch.Tensor  # (N,) float64: 0 when exact, NaN with one t draw per image

    def mean(self) -> float:
        return float(self.bits.mean())

    def monte_carlo_se(self) -> float | None:
        """Standard error of the split's mean from the t and mask draws alone (the images held fixed)."""
        if not bool(torch.isfinite(self.variance).all()):
            return None
        return float(self.variance.sum().sqrt()) / self.bits.numel()

    def images_se(self) -> float | None:
        """Standard error of the mean over images: how far another draw of as many images could move it."""
        n = self.bits.numel()
        return float(self.bits.std(unbiased=True)) / math.sqrt(n) if n > 1 else None

    def se(self) -> tuple[float | None, str]:
        """The error bar to print and what it measures: Monte-Carlo when it can be estimated (K ≥ 2), else
        the spread over images, which contains the Monte-Carlo error and bounds it."""
        mc = self.monte_carlo_se()
        if mc is None:
            return self.images_se(), "images"
        return mc, "exact" if mc == 0 else "monte-carlo"


@dataclass
class NllResult:
    bound: str  # "exact" or "elbo"
    splits: dict[str, SplitNll] = field(default_factory=dict)
    tokens_per_image: int = 0
    dims_per_image: int = 0
    t_draws: int | None = None  # K per image (absorbing); None for the exact autoregressive NLL

    @property
    def per_image(self) -> dict[str, torch.Tensor]:
        return {name: split.bits for name, split in self.splits.items()}

    def bpt(self, split: str) -> float | None:
        return self.splits[split].mean() if split in self.splits else None

    def _per_dim(self, bits_per_token: float | None) -> float | None:
        if bits_per_token is None or not self.dims_per_image:
            return None  # the image size is unknown
        return bits_per_token * self.tokens_per_image / self.dims_per_image

    def bpd(self, split: str) -> float | None:
        return self._per_dim(self.bpt(split))

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for name, split in self.splits.items():
            se = split.se()[0]
            out.update({f"nll_{name}_bpt": split.mean(), f"nll_{name}_bpt_se": se,
                        f"nll_{name}_bpd": self._per_dim(split.mean()), f"nll_{name}_bpd_se": self._per_dim(se)})
        if "train" in self.splits and "val" in self.splits:
            out["nll_gap_bpt"] = out["nll_val_bpt"] - out["nll_train_bpt"]
            out["nll_gap_bpd"] = (out["nll_val_bpd"] - out["nll_train_bpd"]
                                  if out["nll_val_bpd"] is not None else None)
        return out

    def describe(self) -> dict[str, dict[str, float | int | str | None]]:
        """Per split: images, the error bar's kind, and both standard errors (for the JSON report)."""
        return {name: {"n": int(split.bits.numel()), "se_kind": split.se()[1],
                       "se_monte_carlo_bpt": split.monte_carlo_se(), "se_images_bpt": split.images_se()}
                for name, split in self.splits.items()}


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
    split_name: str | None = None,
) -> NllResult:
    """Per-image NLL of the first `n` images (all when None or more) of each latents split.

    `split_name` scores all of the latents' splits together as one split of that name (a held-out test
    set prepared and encoded on its own, say). Each split starts from a generator seeded with `seed`, so
    its numbers do not depend on the other split. `nll_samples` is K, the t draws per image of the
    absorbing prior's ELBO (None: the prior's own setting).
    """
    from vqtool.prior.likelihood import dataset_nll_estimate

    h, w = latents.latent_shape
    size = latents.image_size or 0
    exact = prior.kind == "autoregressive"
    t_draws = None if exact else (nll_samples or prior.objective.get("nll_samples") or prior.objective.get("T"))
    result = NllResult(bound="exact" if exact else "elbo", tokens_per_image=h * w, dims_per_image=3 * size * size,
                       t_draws=t_draws)
    device = next(prior.model.parameters()).device
    for name, split in _splits(latents, split_name).items():
        count = split[0].shape[0] if n is None else min(n, split[0].shape[0])
        tokens = split[0][:count].long()
        labels = None if split[1] is None or prior.cfg.n_classes == 0 else split[1][:count]
        generator = torch.Generator(device=device).manual_seed(seed)
        callback = progress(name) if progress is not None else None
        bits, variance = dataset_nll_estimate(prior, tokens, labels, batch_size, generator, callback, nll_samples)
        result.splits[name] = SplitNll(bits.double(), variance.double())
    return result


def _splits(latents: Latents, split_name: str | None) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """(tokens, labels) of each non-empty split, or of all of them together under `split_name`."""
    present = {name: split for name, split in latents.splits.items() if split.tokens.shape[0] > 0}
    if split_name is None:
        return {name: (split.tokens, split.labels) for name, split in present.items()}
    if not present:
        return {}
    labelled = all(split.labels is not None for split in present.values())
    tokens = torch.cat([split.tokens for split in present.values()])
    labels = torch.cat([split.labels for split in present.values()]) if labelled else None
    return {split_name: (tokens, labels)}
