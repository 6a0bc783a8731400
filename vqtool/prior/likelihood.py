"""Per-image negative log-likelihood of token grids under a trained prior, in bits per token.

Generic over priors: the objective the prior was trained with (`make_objective(prior.kind,
prior.objective)`) defines it. Exact for the autoregressive prior; the ELBO, an upper bound, for the
absorbing prior (Monte-Carlo over t: K stratified draws per image, K = T for every t once), with the
Monte-Carlo variance of each image's estimate so a report can say how many digits to trust.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vqtool.errors import VqtoolError
from vqtool.prior.objectives import make_objective
from vqtool.prior.store import LoadedPrior


def _check(prior: LoadedPrior, tokens: torch.Tensor, labels: torch.Tensor | None) -> None:
    cfg = prior.cfg
    if tokens.dim() != 3 or tuple(tokens.shape[1:]) != tuple(cfg.grid):
        raise VqtoolError(
            f"token grids of shape {tuple(tokens.shape)} do not fit this prior's training grid {tuple(cfg.grid)}; "
            "use the latents the prior was trained on"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
        raise VqtoolError(f"token ids must lie in 0..{cfg.vocab_size - 1} (the prior's codebook size)")
    if cfg.n_classes > 0:
        if labels is None:
            raise VqtoolError("this prior is class-conditional; its likelihood needs the images' class labels")
        if labels.shape != (tokens.shape[0],):
            raise VqtoolError(f"expected {tokens.shape[0]} class labels, got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= cfg.n_classes):
            raise VqtoolError(f"class labels must lie in 0..{cfg.n_classes - 1}")


def dataset_nll(*args: Any, **kwargs: Any) -> torch.Tensor:
    """Bits per token of each grid, (N,) float32 on CPU: `dataset_nll_estimate` without the variance."""
    return dataset_nll_estimate(*args, **kwargs)[0]


def dataset_nll_estimate(
    prior: LoadedPrior,
    tokens: torch.Tensor,
    labels: torch.Tensor | None,
    batch_size: int,
    generator: torch.Generator,
    progress: Callable[[int, int], None] | None = None,
    nll_samples: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bits per token of each grid of `tokens` (N, H, W) and the Monte-Carlo variance of each image's
    estimate (0 for the exact autoregressive NLL; NaN with one t draw), both (N,) float32 on CPU.

    `labels` (N,) class ids for a class-conditional prior (ignored otherwise). `generator` drives every
    random choice (masks, t): the same generator state gives the same numbers for the same batch
    size. `progress(done, total)` is called after each batch, in images. `nll_samples` overrides the
    absorbing prior's K (t draws per image; None keeps the artifact's setting, default every t once).
    """
    if batch_size < 1:
        raise VqtoolError(f"--batch-size must be at least 1 (got {batch_size})")
    _check(prior, tokens, labels)
    settings = dict(prior.objective)
    if nll_samples is not None and "nll_samples" in settings:
        settings["nll_samples"] = nll_samples
    try:
        objective = make_objective(prior.kind, settings)
    except TypeError as exc:
        raise VqtoolError(f"{prior.artifact.path}: objective settings do not fit ({exc})") from None
    model = prior.model
    device = next(model.parameters()).device
    use_labels = prior.cfg.n_classes > 0
    n = tokens.shape[0]
    out = torch.empty(n, dtype=torch.float32)
    variance = torch.empty(n, dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch = tokens[start:stop].to(device).long().reshape(stop - start, -1)
            batch_labels = labels[start:stop].to(device).long() if use_labels else None
            with torch.no_grad():
                bits, var = objective.nll_estimate(model, batch, batch_labels, generator)
                out[start:stop], variance[start:stop] = bits.float().cpu(), var.float().cpu()
            if progress is not None:
                progress(stop, n)
    finally:
        model.train(was_training)
    return out, variance
