"""FID and KID against closed forms on synthetic Gaussian features; statistics files; quantization."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from cut import metrics
from cut.metrics import (
    FeatureStats,
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    polynomial_kernel,
    quantize,
    trace_sqrt_product,
)


def random_covariance(gen: torch.Generator, dim: int, scale: float = 1.0) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    return scale * (a @ a.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64))


def stats(mu: torch.Tensor, sigma: torch.Tensor) -> FeatureStats:
    return FeatureStats(mu, sigma, count=0)


def test_fid_of_gaussians_matches_the_closed_form_for_commuting_covariances():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    d1 = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1, 4.0], dtype=torch.float64)
    d2 = torch.tensor([1.5, 0.2, 2.0, 1.0, 0.9, 0.3], dtype=torch.float64)
    mu1, mu2 = torch.zeros(6, dtype=torch.float64), torch.linspace(-1, 1, 6, dtype=torch.float64)
    # Same eigenvectors: tr sqrt(S1 S2) = sum sqrt(d1 d2), so FID = |mu1 - mu2|² + sum (sqrt d1 - sqrt d2)².
    expected = float((mu1 - mu2).square().sum() + (d1.sqrt() - d2.sqrt()).square().sum())
    got = frechet_distance(stats(mu1, q @ torch.diag(d1) @ q.T), stats(mu2, q @ torch.diag(d2) @ q.T))
    assert got == pytest.approx(expected, rel=1e-10)


def test_trace_of_the_matrix_square_root_matches_the_eigenvalues_of_the_product():
    gen = torch.Generator().manual_seed(1)
    s1, s2 = random_covariance(gen, 12), random_covariance(gen, 12, scale=3.0)
    # S1 S2 is similar to a positive definite matrix: real positive eigenvalues, tr sqrtm = sum of roots.
    eigenvalues = np.linalg.eigvals(s1.numpy() @ s2.numpy())
    assert trace_sqrt_product(s1, s2) == pytest.approx(float(np.sqrt(eigenvalues.real).sum()), rel=1e-10)


def test_fid_of_sampled_gaussian_features_approaches_the_closed_form():
    gen = torch.Generator().manual_seed(2)
    dim, n = 4, 40_000
    sigma1, sigma2 = random_covariance(gen, dim), random_covariance(gen, dim, scale=2.0)
    mu2 = torch.full((dim,), 0.5, dtype=torch.float64)
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(sigma1).T
    y = mu2 + torch.randn(n, dim, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(sigma2).T
    exact = frechet_distance(stats(torch.zeros(dim, dtype=torch.float64), sigma1), stats(mu2, sigma2))
    sampled = frechet_distance(FeatureStats.of(x), FeatureStats.of(y))
    assert sampled == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize("n", [30, 500])  # fewer samples than dimensions: a singular covariance
def test_fid_of_a_feature_set_against_itself_is_zero(n):
    features = torch.randn(n, 64, generator=torch.Generator().manual_seed(n)).float() * 3 + 1
    s = FeatureStats.of(features)
    assert frechet_distance(s, s) == pytest.approx(0.0, abs=1e-9 * float(s.sigma.trace()))


def _gaussian_moments(mean: float, std: float) -> tuple[float, float, float]:
    return mean, mean**2 + std**2, mean**3 + 3 * mean * std**2


def _expected_kernel(p: tuple[float, ...], q: tuple[float, ...], dim: int) -> float:
    """E (u·v / D + 1)³ for independent u, v with i.i.d. Gaussian coordinates of raw moments p and q."""
    m1, m2, m3 = (a * b for a, b in zip(p, q, strict=True))
    s1 = dim * m1
    s2 = dim * m2 + dim * (dim - 1) * m1**2
    s3 = dim * m3 + 3 * dim * (dim - 1) * m2 * m1 + dim * (dim - 1) * (dim - 2) * m1**3
    return 1 + 3 * s1 / dim + 3 * s2 / dim**2 + s3 / dim**3


def test_kid_estimator_is_unbiased_against_the_closed_form_mmd():
    dim, trials, m = 4, 3000, 8
    p, q = _gaussian_moments(0.0, 1.0), _gaussian_moments(0.5, 1.5)
    exact = _expected_kernel(p, p, dim) + _expected_kernel(q, q, dim) - 2 * _expected_kernel(p, q, dim)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(trials, m, dim, generator=gen, dtype=torch.float64)
    y = 0.5 + 1.5 * torch.randn(trials, m, dim, generator=gen, dtype=torch.float64)
    values = torch.tensor([
        mmd2_unbiased(polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b))
        for a, b in zip(x, y, strict=True)
    ])
    stderr = float(values.std()) / math.sqrt(trials)
    assert abs(float(values.mean()) - exact) < 4 * stderr
    assert stderr < 0.05 * exact  # the test has the power to see the bias of samples this small


def test_kid_of_two_samples_of_one_distribution_is_near_zero_and_above_zero_otherwise():
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(600, 16, generator=gen), torch.randn(600, 16, generator=gen)
    same, same_std = kernel_inception_distance(x, y, subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 0.5, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 10 * (abs(same) + same_std)


def test_kid_subsets_give_the_same_values_from_full_or_per_subset_kernels(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(50, 8, generator=gen), torch.randn(40, 8, generator=gen) + 0.3
    full = kernel_inception_distance(x, y, subsets=5, subset_size=30, seed=1)
    monkeypatch.setattr(metrics, "FULL_KERNEL_LIMIT", 0)
    per_subset = kernel_inception_distance(x, y, subsets=5, subset_size=30, seed=1)
    assert per_subset == pytest.approx(full, rel=1e-12)


def test_kid_needs_two_features_per_set():
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(torch.randn(1, 4), torch.randn(5, 4))


def test_statistics_round_trip_and_pytorch_fid_files_are_read():
    features = torch.randn(20, 6, generator=torch.Generator().manual_seed(6))
    s = FeatureStats.of(features)
    back = FeatureStats.from_bytes(s.to_bytes())
    assert back.count == 20 and back.features is not None
    assert torch.equal(back.mu, s.mu) and torch.equal(back.sigma, s.sigma)
    assert torch.equal(back.features, s.features)
    np.testing.assert_allclose(s.sigma.numpy(), np.cov(features.double().numpy(), rowvar=False), rtol=1e-12)

    buffer = io.BytesIO()
    np.savez(buffer, mu=s.mu.numpy(), sigma=s.sigma.numpy())  # what pytorch-fid's --save-stats writes
    plain = FeatureStats.from_bytes(buffer.getvalue())
    assert plain.features is None and frechet_distance(plain, s) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="not a statistics"):
        FeatureStats.from_bytes(b"not an npz", "ref.npz")


def test_quantize_truncates_like_the_official_image_saving():
    y = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 5.0]).view(1, 1, 2, 3)
    levels = ((quantize(y) + 1) / 2 * 255).round().flatten().tolist()
    assert levels == [0, 0, 127, 254, 255, 255]  # 127.5 and 254.87 truncate down
