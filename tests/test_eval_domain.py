"""The domain classifier: it separates two synthetic domains, and its export loads safely."""

from __future__ import annotations

import math

import pytest
import torch

from cut.checkpoint import CheckpointError, read_checkpoint, to_bytes
from cut.domain import (
    DomainClassifier,
    classifier_from_export,
    domain_accuracy,
    export_classifier,
    share_classified_b,
    train_domain_classifier,
)

SIZE = 32


def synthetic_domain(domain: str, n: int, seed: int) -> torch.Tensor:
    """Random colours on a smooth ramp (A) or on stripes of 2 to 4 cycles (B), any orientation, noisy."""
    gen = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0, 1, SIZE)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = torch.rand(n, 1, 1, generator=gen) * math.pi
    along = xx * angle.cos() + yy * angle.sin()
    if domain == "A":
        pattern = 2 * along / along.amax(dim=(1, 2), keepdim=True).clamp(min=1e-6) - 1
    else:
        cycles = 2 + 2 * torch.rand(n, 1, 1, generator=gen)
        pattern = torch.sign(torch.sin(2 * math.pi * cycles * along))
    colour = torch.rand(n, 3, 1, 1, generator=gen) * 2 - 1
    noise = 0.1 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    return (colour * pattern[:, None] + noise).clamp(-1, 1)


def test_the_classifier_separates_two_synthetic_domains():
    train_a, train_b = synthetic_domain("A", 96, 0), synthetic_domain("B", 64, 1)  # unequal sizes on purpose
    losses: list[float] = []
    net = train_domain_classifier(train_a, train_b, epochs=8, batch_size=16, lr=5e-3, width=8, seed=0,
                                  on_epoch=lambda epoch, loss: losses.append(loss))
    assert len(losses) == 8 and losses[-1] < losses[0]
    accuracy = domain_accuracy(net, synthetic_domain("A", 50, 2), synthetic_domain("B", 50, 3))
    assert accuracy["accuracy_a"] >= 0.85 and accuracy["accuracy_b"] >= 0.85
    # Any image size goes in: larger images are downscaled to the classifier's size first.
    big_b = torch.nn.functional.interpolate(synthetic_domain("B", 20, 4), scale_factor=2, mode="nearest")
    assert share_classified_b(net, big_b) >= 0.85


def test_training_is_reproducible_and_leaves_the_global_rng_alone():
    a, b = synthetic_domain("A", 16, 5), synthetic_domain("B", 16, 6)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = train_domain_classifier(a, b, epochs=1, batch_size=8, width=4, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = train_domain_classifier(a, b, epochs=1, batch_size=8, width=4, seed=7)
    for x, y in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_export_round_trip_keeps_weights_and_metadata():
    net = DomainClassifier(image_size=SIZE, width=4).eval()
    data = to_bytes(export_classifier(net, test_accuracy=0.93, train_a="s3://b/trainA"))
    loaded, meta = classifier_from_export(read_checkpoint(data, "domain.pt"), "domain.pt")  # weights_only
    assert meta == {"test_accuracy": 0.93, "train_a": "s3://b/trainA"}
    assert loaded.architecture == {"image_size": SIZE, "width": 4} and not loaded.training
    x = synthetic_domain("B", 4, 8)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), net(x))


def _hostile_export(**changes: object) -> dict:
    export = export_classifier(DomainClassifier(image_size=SIZE, width=4))
    export.update(changes)
    return read_checkpoint(to_bytes(export), "domain.pt")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"architecture": {"image_size": SIZE, "width": 512}, "state_dict": {}},
         r"declared classifier .*width': 512.* does not match its tensors: missing"),
        ({"architecture": {"image_size": SIZE, "width": 10**6}},
         r"width=1000000; expected an integer in 1\.\.1024"),
        ({"architecture": {"image_size": SIZE, "width": 4, "depth": 9}},
         r"unknown architecture fields \['depth'\]"),
        ({"architecture": [SIZE, 4]}, r"architecture must be a mapping"),
        ({"metadata": "accurate"}, r"metadata must be a mapping"),
    ],
)
def test_a_classifier_export_is_checked_against_its_tensors_before_anything_is_built(changes, message):
    with pytest.raises(CheckpointError, match=message):
        classifier_from_export(_hostile_export(**changes), "domain.pt")


def test_a_classifier_export_with_nan_weights_is_refused():
    export = _hostile_export()
    export["state_dict"]["head.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        classifier_from_export(export, "domain.pt")
