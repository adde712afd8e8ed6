"""Translation quality as numbers: FID, KID, the domain, content and translation scores.

FID and KID follow pytorch-fid and torch-fidelity (Inception pool3 features; KID with the cubic
polynomial kernel, unbiased, averaged over random subsets). Means, covariances and the matrix square
root are computed in float64. The domain score is the share of outputs a domain classifier puts in
B; it alone rewards any output the classifier has never seen (noise lands in B as easily as in A).
The content score (``cut.content``) says whether an output keeps its input's layout; the
translation score of an image is the lower of the two, min(P(B | output), content score): high only
when the output both looks like B and keeps its input. ``QualityMeter`` streams batches of
translated images through the networks; ``evaluate_generator`` evaluates a generator on held-out
images.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cut.content import content_score
from cut.domain import DomainClassifier

FULL_KERNEL_LIMIT = 4000  # three float64 kernel matrices of this side take ~0.4 GB


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64) of a feature set, and the features themselves (needed by KID)."""

    mu: torch.Tensor
    sigma: torch.Tensor
    count: int  # -1 when unknown (a pytorch-fid file)
    features: torch.Tensor | None = None

    @classmethod
    def of(cls, features: torch.Tensor) -> FeatureStats:
        """Statistics of (N, D) features; the covariance is unbiased (N - 1), as ``np.cov``."""
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors of shape (N, D), got {tuple(features.shape)}")
        f = features.detach().cpu().double()
        mu = f.mean(0)
        centered = f - mu  # two passes: no cancellation from subtracting large second moments
        sigma = centered.T @ centered / (f.shape[0] - 1)
        return cls(mu, sigma, int(f.shape[0]), features.detach().cpu().float())

    def to_bytes(self) -> bytes:
        """An ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's layout), ``count`` and the features."""
        arrays = {"mu": self.mu.numpy(), "sigma": self.sigma.numpy(), "count": np.asarray(self.count)}
        if self.features is not None:
            arrays["features"] = self.features.numpy()
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "statistics") -> FeatureStats:
        """Read ``to_bytes`` output, or a pytorch-fid ``.npz`` (``mu``, ``sigma``; no KID then)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise ValueError(f"{source}: not a statistics .npz file ({exc})") from exc
        if "mu" not in arrays or "sigma" not in arrays:
            raise ValueError(f"{source}: statistics need arrays 'mu' and 'sigma', found {sorted(arrays)}")
        features = torch.from_numpy(arrays["features"]) if "features" in arrays else None
        count = int(arrays["count"]) if "count" in arrays else -1
        return cls(torch.from_numpy(arrays["mu"]).double(), torch.from_numpy(arrays["sigma"]).double(),
                   count, features)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues rounded below 0 clipped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> float:
    """tr(sqrtm(sigma1 @ sigma2)) for covariance matrices, in float64.

    sigma1 @ sigma2 has the eigenvalues of the symmetric S1^½ S2 S1^½, so the trace is the sum of the
    square roots of that matrix's eigenvalues: no non-symmetric square root, no complex parts, and
    singular covariances (fewer samples than dimensions) need no regularising offset.
    """
    root = _psd_sqrt(sigma1.double())
    inner = root @ sigma2.double() @ root
    values = torch.linalg.eigvalsh((inner + inner.T) / 2)
    return float(values.clamp(min=0).sqrt().sum())


def frechet_distance(a: FeatureStats, b: FeatureStats) -> float:
    """||mu_a - mu_b||² + tr(S_a) + tr(S_b) - 2 tr(sqrtm(S_a S_b)), never below 0."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {tuple(a.mu.shape)} and {tuple(b.mu.shape)}")
    diff = a.mu.double() - b.mu.double()
    value = float(diff @ diff) + float(a.sigma.trace() + b.sigma.trace())
    return max(0.0, value - 2 * trace_sqrt_product(a.sigma, b.sigma))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(u, v) = (u·v / D + 1)³ for every pair of rows of ``x`` and ``y``."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(k_xx: torch.Tensor, k_yy: torch.Tensor, k_xy: torch.Tensor) -> float:
    """Unbiased MMD² from the kernel matrices of two samples (the diagonals of k_xx and k_yy left out)."""
    m, n = k_xx.shape[0], k_yy.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * k_xy.mean())


def kernel_inception_distance(x: torch.Tensor, y: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID as (mean, std) of the unbiased polynomial MMD² over ``subsets`` random subsets of each set.

    A subset holds ``subset_size`` features drawn without replacement, or all of the smaller set.
    Sets of up to FULL_KERNEL_LIMIT features get their kernel matrices once, subsets index them.
    """
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 features per set, got {x.shape[0]} and {y.shape[0]}")
    xd, yd = x.detach().cpu().double(), y.detach().cpu().double()
    full = max(xd.shape[0], yd.shape[0]) <= FULL_KERNEL_LIMIT
    if full:
        k_xx, k_yy, k_xy = polynomial_kernel(xd, xd), polynomial_kernel(yd, yd), polynomial_kernel(xd, yd)
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        ix = torch.randperm(xd.shape[0], generator=gen)[:size]
        iy = torch.randperm(yd.shape[0], generator=gen)[:size]
        if full:
            values.append(mmd2_unbiased(k_xx[ix][:, ix], k_yy[iy][:, iy], k_xy[ix][:, iy]))
        else:
            sx, sy = xd[ix], yd[iy]
            values.append(mmd2_unbiased(polynomial_kernel(sx, sx), polynomial_kernel(sy, sy),
                                        polynomial_kernel(sx, sy)))
    result = torch.tensor(values, dtype=torch.float64)
    return float(result.mean()), float(result.std()) if subsets > 1 else 0.0


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images as the 3 channels the scoring networks take: grey (C 1, 2) repeated,
    alpha (C 2, 4) left out; of more channels, the first three."""
    channels = images.shape[1]
    if channels == 3:
        return images
    return images[:, :3] if channels >= 4 else images[:, :1].expand(-1, 3, -1, -1)


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Generator output as it reads back from a saved 8-bit image: clamp, truncate to uint8 as the
    official test does, and map back to [-1, 1]; in-memory scores then match scores of the files."""
    pixels = ((images.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    return pixels.float().div(255.0).sub(0.5).div(0.5)


def translation_score(domain_probability: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """Per image: min(P(B | output), content score), in [0, 1]. Identity outputs keep the content
    but stay in A; noise or garbage may land in B but keeps no content: both score low."""
    return torch.minimum(domain_probability, content)


class QualityMeter:
    """Accumulates, over batches of images in [-1, 1], Inception features, the domain classifier's
    P(B) per image and, when the inputs are given, the content score of each image against its input."""

    def __init__(self, inception: nn.Module | None = None,
                 classifier: DomainClassifier | None = None) -> None:
        self.inception, self.classifier = inception, classifier
        self.features: list[torch.Tensor] = []
        self.probability_b: list[torch.Tensor] = []
        self.content: list[torch.Tensor] = []
        self.count = 0

    @torch.inference_mode()
    def update(self, images: torch.Tensor, inputs: torch.Tensor | None = None) -> None:
        """Add a batch (on the networks' device); ``inputs`` are the images ``images`` translate
        (any channel count: scored as RGB, see ``as_rgb``)."""
        images = as_rgb(images)
        inputs = None if inputs is None else as_rgb(inputs)
        if self.inception is not None:
            self.features.append(self.inception(images).float().cpu())
        if self.classifier is not None:
            self.probability_b.append(torch.sigmoid(self.classifier(images).float()).cpu())
        if inputs is not None:
            self.content.append(content_score(inputs, images).cpu())
        self.count += images.shape[0]

    def stats(self) -> FeatureStats:
        """Statistics of the features seen so far (needs an Inception network)."""
        if self.inception is None:
            raise ValueError("no Inception network: FID and KID are unavailable")
        return FeatureStats.of(torch.cat(self.features))

    def domain_score(self) -> float:
        """Share of the images the domain classifier puts in domain B (P(B) > 0.5)."""
        if self.classifier is None or not self.count:
            raise ValueError("no domain classifier or no images: the domain score is unavailable")
        return float((torch.cat(self.probability_b) > 0.5).float().mean())

    def per_image(self) -> dict[str, list[float]]:
        """``domain_probability``, ``content_score`` and ``translation_score`` of each image seen, in
        order, where computable."""
        columns: dict[str, torch.Tensor] = {}
        if self.probability_b:
            columns["domain_probability"] = torch.cat(self.probability_b)
        if self.content and sum(len(c) for c in self.content) == self.count:  # inputs with every batch
            columns["content_score"] = torch.cat(self.content)
        if {"domain_probability", "content_score"} <= columns.keys():
            columns["translation_score"] = translation_score(columns["domain_probability"],
                                                             columns["content_score"])
        return {name: values.tolist() for name, values in columns.items()}

    def scores(self, reference: FeatureStats | None, kid_subsets: int = 100, kid_subset_size: int = 1000,
               seed: int = 0) -> dict[str, float]:
        """``count``; ``domain_score``, ``content_score``, ``translation_score`` (means over the
        images) where computable; ``fid``, ``kid``, ``kid_std`` against ``reference``."""
        out: dict[str, float] = {"count": float(self.count)}
        if self.classifier is not None and self.count:
            out["domain_score"] = self.domain_score()
        for name, values in self.per_image().items():
            if name != "domain_probability":
                out[name] = sum(values) / len(values)
        if self.inception is not None and reference is not None and self.count >= 2:
            own = self.stats()
            out["fid"] = frechet_distance(own, reference)
            if reference.features is not None:
                assert own.features is not None
                out["kid"], out["kid_std"] = kernel_inception_distance(
                    own.features, reference.features, kid_subsets, kid_subset_size, seed)
        return out


def reference_statistics(inception: nn.Module, images: Iterable[torch.Tensor]) -> FeatureStats:
    """Inception statistics of real images (batches in [-1, 1] on the network's device): FID's reference."""
    meter = QualityMeter(inception)
    for batch in images:
        meter.update(batch)
    return meter.stats()


def evaluate_generator(netG: nn.Module, images: Iterable[torch.Tensor],
                       domain_classifier: DomainClassifier | None = None, inception: nn.Module | None = None,
                       reference: FeatureStats | None = None,
                       kid_subset_size: int = 1000) -> dict[str, float]:
    """Translate held-out batches (domain A, [-1, 1], any device) and score the outputs.

    Returns ``count``, ``content_score`` and, where the networks allow, ``domain_score`` (share
    classified as B), ``translation_score``, and ``fid``, ``kid``, ``kid_std`` against ``reference``
    (Inception statistics of real B images). Every
    network must already be on the generator's device. The generator's train/eval mode is restored.
    """
    device = next(netG.parameters()).device
    meter = QualityMeter(inception, domain_classifier)
    was_training = netG.training
    netG.eval()
    try:
        with torch.inference_mode():
            for batch in images:
                x = batch.to(device)
                meter.update(quantize(netG(x)), inputs=x)
    finally:
        netG.train(was_training)
    return meter.scores(reference, kid_subset_size=kid_subset_size)
