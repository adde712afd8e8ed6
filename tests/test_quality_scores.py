"""Content and translation scores: range and direction on constructed scenes, and the saturation case
(noise or identity outputs must score low even when the domain classifier is fooled)."""

import numpy as np
import pytest
import torch

from cut.content import content_score
from cut.domain import DomainClassifier, domain_accuracy, train_domain_classifier
from cut.metrics import QualityMeter, translation_score


def scenes(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth colour backgrounds with two dark ellipses each, (N, 3, size, size) in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        coeffs = rng.uniform(-0.3, 0.3, (3, 3))
        image = 0.6 + coeffs[:, 0, None, None] * xx + coeffs[:, 1, None, None] * yy
        for _ in range(2):
            cx, cy, rx, ry = rng.uniform(0.2, 0.8, 2).tolist() + rng.uniform(0.1, 0.25, 2).tolist()
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
            image = np.where(inside, rng.uniform(0.0, 0.35, (3, 1, 1)), image)
        out.append(image)
    return torch.from_numpy(np.clip(np.stack(out), 0, 1) * 2 - 1).float()


def striped(images: torch.Tensor, period: int = 8) -> torch.Tensor:
    """The scenes restyled: grey, their dark regions filled with black and grey diagonal stripes
    (still darker than the background on average, as a zebra's coat against grass)."""
    size = images.shape[-1]
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    stripes = ((rows + cols) // (period // 2) % 2).float() - 1
    grey = images.mean(1, keepdim=True)
    dark = grey < -0.2
    return torch.where(dark, stripes, grey).expand(-1, 3, -1, -1)


def test_content_score_is_one_for_identity_and_near_zero_for_noise_constant_or_unrelated_scenes():
    x = scenes(8)
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(x.shape, generator=g) * 2 - 1
    assert torch.allclose(content_score(x, x), torch.ones(8))
    assert content_score(x, noise).max() < 0.05
    assert content_score(x, torch.zeros_like(x)).max() < 1e-6
    assert content_score(x, -x).max() == 0  # inverted layout: negative, clipped at 0
    assert content_score(x, scenes(8, seed=9)).mean() < 0.2
    colour_change = x[:, [2, 0, 1]]
    assert content_score(x, colour_change).mean() > 0.8


def test_content_score_stays_high_when_a_scene_is_restyled_at_any_size():
    for size in (64, 256):
        x = scenes(6, size=size, seed=3)
        restyled = striped(x, period=max(4, size // 16))
        scores = content_score(x, restyled)
        assert scores.min() > 0.6 and scores.max() <= 1
        assert content_score(x, restyled.roll(size // 2, dims=-1)).mean() < scores.mean() - 0.3


def test_content_score_compares_images_of_different_sizes_and_checks_counts():
    x = scenes(2, size=128)
    small = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", antialias=True)
    assert content_score(x, small).min() > 0.95
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        content_score(x, small[:1])


def test_translation_score_is_the_lower_of_domain_probability_and_content():
    p = torch.tensor([0.9, 0.1, 1.0, 0.6])
    c = torch.tensor([0.8, 1.0, 0.02, 0.7])
    assert translation_score(p, c).tolist() == pytest.approx([0.8, 0.1, 0.02, 0.6])


@pytest.fixture(scope="module")
def classifier() -> DomainClassifier:
    """Told real flat scenes (A) from their striped versions (B) after training on others."""
    a = scenes(48, seed=10)
    return train_domain_classifier(a, striped(scenes(48, seed=11)), epochs=15, batch_size=16, width=8)


def meter_scores(net: DomainClassifier, inputs: torch.Tensor, outputs: torch.Tensor) -> dict[str, float]:
    meter = QualityMeter(classifier=net)
    meter.update(outputs, inputs=inputs)
    return meter.scores(None)


def test_noise_and_identity_score_low_and_a_real_translation_scores_high(classifier):
    x = scenes(16, seed=20)
    assert domain_accuracy(classifier, x, striped(x))["accuracy"] >= 0.9
    identity = meter_scores(classifier, x, x)
    assert identity["content_score"] == pytest.approx(1.0) and identity["translation_score"] <= 0.25
    translated = meter_scores(classifier, x, striped(x))
    assert translated["domain_score"] >= 0.8 and translated["translation_score"] >= 0.5
    # the saturation case: outputs the classifier puts in B without keeping anything of the input
    fooled = DomainClassifier(width=4).eval()
    torch.nn.init.constant_(fooled.head.bias, 20.0)
    g = torch.Generator().manual_seed(2)
    noise = meter_scores(fooled, x, torch.rand(x.shape, generator=g) * 2 - 1)
    assert noise["domain_score"] == 1.0 and noise["translation_score"] <= 0.05
    other_scenes = meter_scores(classifier, x, striped(scenes(16, seed=21)))
    assert other_scenes["domain_score"] >= 0.8 and other_scenes["translation_score"] <= 0.25


def test_the_meter_reports_each_image_in_order():
    x = scenes(3, seed=30)
    meter = QualityMeter(classifier=DomainClassifier(width=4).eval())
    meter.update(x[:2], inputs=x[:2])
    meter.update(-x[2:], inputs=x[2:])
    per_image = meter.per_image()
    assert per_image["content_score"] == pytest.approx([1.0, 1.0, 0.0], abs=1e-5)
    assert len(per_image["domain_probability"]) == 3
    assert per_image["translation_score"] == pytest.approx(
        np.minimum(per_image["domain_probability"], per_image["content_score"]).tolist())
    without_inputs = QualityMeter(classifier=DomainClassifier(width=4).eval())
    without_inputs.update(x)
    assert set(without_inputs.scores(None)) == {"count", "domain_score"}
