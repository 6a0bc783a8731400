"""FID/KID/PRDC on feature sets: against closed forms, the libraries called directly, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from vqtool.errors import VqtoolError
from vqtool.eval import metrics


def _gaussian(n: int, mean: torch.Tensor, cov_sqrt: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, mean.numel(), generator=g, dtype=torch.float64) @ cov_sqrt.T + mean


def _closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the fitted Gaussians, with scipy's matrix square root."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_fid_of_a_set_against_itself_is_zero():
    x = _gaussian(300, torch.zeros(8, dtype=torch.float64), torch.eye(8, dtype=torch.float64), seed=0)
    assert abs(metrics.fid(x, x)) < 1e-6


def test_fid_between_two_gaussian_sets_matches_scipy_closed_form():
    d = 6
    g = torch.Generator().manual_seed(1)
    a_sqrt = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5 + torch.eye(d, dtype=torch.float64)
    b_sqrt = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3 + 2 * torch.eye(d, dtype=torch.float64)
    a = _gaussian(500, torch.zeros(d, dtype=torch.float64), a_sqrt, seed=2)
    b = _gaussian(400, torch.full((d,), 1.5, dtype=torch.float64), b_sqrt, seed=3)
    expected = _closed_form_fid(a.numpy(), b.numpy())
    assert expected > 1.0  # a real difference, not a trivial zero
    assert metrics.fid(a, b) == pytest.approx(expected, rel=1e-6)
    assert metrics.fid(a.float(), b.float()) == pytest.approx(expected, rel=1e-4)


def test_fid_of_shifted_mean_equals_squared_shift():
    x = _gaussian(200, torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64), seed=4)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert metrics.fid(x, x + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)


def test_kid_near_zero_for_same_distribution_and_larger_for_a_shift():
    a = _gaussian(120, torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64), seed=5)
    b = _gaussian(120, torch.zeros(5, dtype=torch.float64), torch.eye(5, dtype=torch.float64), seed=6)
    c = b + 2.0
    same, _ = metrics.kid(a, b, subsets=20, subset_size=50)
    shifted, std = metrics.kid(a, c, subsets=20, subset_size=50)
    assert abs(same) < 0.1 * shifted
    assert shifted > 0 and std >= 0


def test_kid_matches_torch_fidelity_and_caps_the_subset_size():
    from torch_fidelity.metric_kid import kid_features_to_metric

    a = _gaussian(30, torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64), seed=7)
    b = a * 1.5 + 0.3
    mean, std = metrics.kid(a, b, subsets=10, subset_size=1000, seed=3)  # 1000 > 30: capped to 30
    ref = kid_features_to_metric(a, b, kid_subsets=10, kid_subset_size=30, verbose=False, rng_seed=3)
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"])
    assert std == pytest.approx(ref["kernel_inception_distance_std"])
    assert metrics.kid_subset_size(30, 40) == 30


def test_prdc_matches_the_prdc_package_on_planted_data():
    from prdc import compute_prdc

    g = torch.Generator().manual_seed(8)
    real = torch.randn(80, 4, generator=g)
    # Planted: half the fakes are copies of real points (inside the real manifold), half are far outliers.
    fake = torch.cat([real[:30] + 0.01 * torch.randn(30, 4, generator=g), torch.randn(30, 4, generator=g) + 25.0])
    ours = metrics.prdc(real, fake, nearest_k=5)
    ref = compute_prdc(real.numpy(), fake.numpy(), nearest_k=5)
    assert set(ours) == {"precision", "recall", "density", "coverage"}
    for key, value in ref.items():
        assert ours[key] == pytest.approx(float(value))
    assert ours["precision"] == pytest.approx(0.5)  # exactly the planted half lies on the real manifold


def test_prdc_of_identical_sets_is_perfect():
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(9))
    out = metrics.prdc(x, x.clone(), nearest_k=3)
    assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0


def test_too_few_images_is_a_one_line_error():
    x = torch.randn(4, 3)
    with pytest.raises(VqtoolError, match="--nearest-k 5"):
        metrics.prdc(x, x, nearest_k=5)
    with pytest.raises(VqtoolError, match="FID needs at least 2"):
        metrics.fid(x[:1], x)


def test_mismatched_feature_dimensions_are_refused():
    with pytest.raises(ValueError, match="equal D"):
        metrics.fid(torch.randn(5, 3), torch.randn(5, 4))
