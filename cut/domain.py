"""The domain classifier: a small CNN that tells domain B from domain A on downscaled images.

Trained on the real A and B training images, it scores a translation by the share of translated
images it puts in B. It needs no downloaded weights, so a run's progress is visible on any machine.
Saved as an export (architecture, state dict, metadata such as its accuracy on real test images).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cut.checkpoint import CheckpointError, load_strict, state_mismatch, tensor_state

EXPORT_FORMAT = "cut-pipeline/domain-classifier"
EXPORT_VERSION = 1
IMAGE_SIZE = 64
SHIFT = 4  # pixels of random translation in training


def downscale(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) images in [-1, 1] to (N, 3, size, size), antialiased bilinear; a no-op at that size."""
    if images.shape[-2:] == (size, size):
        return images.float()
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


class DomainClassifier(nn.Module):
    """Four strided conv layers, global average pooling, one logit: > 0 means domain B."""

    def __init__(self, image_size: int = IMAGE_SIZE, width: int = 32) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {image_size}")
        self.image_size, self.width = image_size, width
        layers: list[nn.Module] = []
        channels = [3, width, 2 * width, 4 * width, 8 * width]
        for cin, cout in itertools.pairwise(channels):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.LeakyReLU(0.2, inplace=True)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(8 * width, 1)

    @property
    def architecture(self) -> dict[str, int]:
        """Constructor arguments that rebuild this network."""
        return {"image_size": self.image_size, "width": self.width}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N,) for images in [-1, 1] of any size (downscaled to ``image_size`` first)."""
        x = self.features(downscale(images, self.image_size))
        return self.head(x.mean(dim=(2, 3))).squeeze(1)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and a random shift of up to SHIFT pixels (reflected borders)."""
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (SHIFT,) * 4, mode="reflect")
    dy, dx = torch.randint(0, 2 * SHIFT + 1, (2,), generator=gen).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


def train_domain_classifier(images_a: torch.Tensor, images_b: torch.Tensor, *, epochs: int = 20,
                            batch_size: int = 64, lr: float = 2e-3, width: int = 32, seed: int = 0,
                            device: torch.device | str = "cpu",
                            on_epoch: Callable[[int, float], None] | None = None) -> DomainClassifier:
    """Train on real images of A (label 0) and B (label 1): (N, 3, S, S) tensors in [-1, 1], where S is
    the classifier's image size (see ``downscale``). Adam, cosine learning rate, flips and shifts; the
    loss weighs the domains equally whatever their sizes. ``on_epoch(epoch, mean_loss)`` reports."""
    if len(images_a) < 1 or len(images_b) < 1:
        raise ValueError("training the domain classifier needs images of both domains")
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's global RNG untouched
        torch.manual_seed(seed)
        net = DomainClassifier(images_a.shape[-1], width).to(device)
    images = torch.cat([images_a, images_b]).float()
    labels = torch.cat([torch.zeros(len(images_a)), torch.ones(len(images_b))])
    pos_weight = torch.tensor(len(images_a) / len(images_b), device=device)
    steps_per_epoch = -(-len(images) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    net.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        total = 0.0
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            x = _augment(images[idx], gen).to(device)
            y = labels[idx].to(device)
            loss = F.binary_cross_entropy_with_logits(net(x), y, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(images))
    return net.eval()


def held_out_split(images: torch.Tensor, share: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held out): a seeded random ``share`` of ``images`` (at least one image) kept aside."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    count = max(1, round(share * len(images)))
    return images[order[count:]], images[order[:count]]


@torch.inference_mode()
def share_classified_b(net: DomainClassifier, images: torch.Tensor, batch_size: int = 256) -> float:
    """Share of ``images`` (N, 3, H, W in [-1, 1]) that ``net`` puts in domain B."""
    device = next(net.parameters()).device
    votes = sum(int((net(images[i:i + batch_size].to(device)) > 0).sum())
                for i in range(0, len(images), batch_size))
    return votes / max(1, len(images))


def domain_accuracy(net: DomainClassifier, images_a: torch.Tensor,
                    images_b: torch.Tensor) -> dict[str, float]:
    """Accuracy on each domain and their mean (balanced accuracy, fair to sets of unequal size)."""
    acc_a = 1.0 - share_classified_b(net, images_a)
    acc_b = share_classified_b(net, images_b)
    return {"accuracy_a": acc_a, "accuracy_b": acc_b, "accuracy": (acc_a + acc_b) / 2}


def export_classifier(net: DomainClassifier, **metadata: Any) -> dict[str, Any]:
    """A self-describing export for ``torch.save``; metadata must be plain types (weights_only loading)."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "architecture": net.architecture,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "metadata": metadata,
    }


def classifier_from_export(obj: Any,
                           source: str = "domain classifier") -> tuple[DomainClassifier, dict[str, Any]]:
    """The network (eval mode) and metadata of an ``export_classifier`` object."""
    if not isinstance(obj, Mapping) or obj.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{source}: not a domain classifier export")
    if obj.get("version") != EXPORT_VERSION:
        raise CheckpointError(f"{source}: export version {obj.get('version')} is not supported")
    architecture = _checked_architecture(obj.get("architecture"), source)
    state = tensor_state(obj.get("state_dict"), f"{source}: domain classifier")
    with torch.device("meta"):  # shapes only: a declared width is compared before it is allocated
        declared = DomainClassifier(**architecture).state_dict()
    parts = state_mismatch(declared, state)
    if parts:
        raise CheckpointError(f"{source}: the declared classifier ({architecture}) does not match its "
                              f"tensors: {'; '.join(parts)}")
    net = DomainClassifier(**architecture)
    try:
        load_strict(net, state, "domain classifier")
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    metadata = obj.get("metadata", {})
    if not isinstance(metadata, Mapping):
        raise CheckpointError(f"{source}: metadata must be a mapping, got {type(metadata).__name__}")
    return net.eval(), dict(metadata)


# Bounds on what an export may declare: wide enough for any classifier this project trains.
ARCHITECTURE_BOUNDS = {"image_size": (16, 1024), "width": (1, 1024)}


def _checked_architecture(architecture: Any, source: str) -> dict[str, int]:
    """The export's constructor arguments, when they are known integer fields within bounds."""
    if not isinstance(architecture, Mapping):
        raise CheckpointError(f"{source}: architecture must be a mapping, got {type(architecture).__name__}")
    unknown = sorted(set(architecture) - set(ARCHITECTURE_BOUNDS))
    if unknown:
        raise CheckpointError(f"{source}: unknown architecture fields {unknown}")
    checked = {}
    for field, value in architecture.items():
        low, high = ARCHITECTURE_BOUNDS[field]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise CheckpointError(f"{source}: architecture {field}={value!r}; expected an integer in "
                                  f"{low}..{high}")
        checked[field] = value
    return checked
