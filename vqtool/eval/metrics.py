"""FID and KID through torch-fidelity, PRDC through the `prdc` package, all on features computed once.

These functions only adapt shapes and types; the mathematics is the libraries' own.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch

from vqtool.errors import VqtoolError


def fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N, D), torch-fidelity's formula."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    _check_pair(real, fake, minimum=2, what="FID")
    stats_real = fid_features_to_statistics(real.double().cpu())
    stats_fake = fid_features_to_statistics(fake.double().cpu())
    return float(fid_statistics_to_metric(stats_real, stats_fake, verbose=False)[KEY_METRIC_FID])


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (mean, std over random subsets), torch-fidelity's polynomial-kernel MMD.

    The subset size is capped at the smaller set, so a small --n still gives a number (recorded in the report).
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    _check_pair(real, fake, minimum=2, what="KID")
    size = min(subset_size, real.shape[0], fake.shape[0])
    out = kid_features_to_metric(real.double().cpu(), fake.double().cpu(), kid_subsets=subsets,
                                 kid_subset_size=size, verbose=False, rng_seed=seed)
    return float(out[KEY_METRIC_KID_MEAN]), float(out[KEY_METRIC_KID_STD])


def kid_subset_size(n_real: int, n_fake: int, subset_size: int = 1000) -> int:
    return min(subset_size, n_real, n_fake)


def prdc(real: torch.Tensor, fake: torch.Tensor, nearest_k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) from the `prdc` package."""
    from prdc import compute_prdc

    _check_pair(real, fake, minimum=nearest_k + 1, what=f"PRDC with --nearest-k {nearest_k}")
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints the set sizes
        out = compute_prdc(real_features=real.float().cpu().numpy(), fake_features=fake.float().cpu().numpy(),
                           nearest_k=nearest_k)
    return {k: float(np.asarray(v)) for k, v in out.items()}


def _check_pair(real: torch.Tensor, fake: torch.Tensor, minimum: int, what: str) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    n = min(real.shape[0], fake.shape[0])
    if n < minimum:
        raise VqtoolError(f"--n {n}: {what} needs at least {minimum} images per set")
