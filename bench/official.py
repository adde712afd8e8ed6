"""The official network's computation, for baselines in the benchmarks.

Our models swap fast forms into the official layers (``cut.fast.accelerate``); this swaps the
official layers back: the blur up- and downsampling through plain autograd, torch's InstanceNorm2d,
plain nn.Conv2d in the ResNet blocks. The same parameters and function at the official cost. A
baseline named "official" runs this.
"""

from __future__ import annotations

from torch import nn

from cut.fast import FAST_FORMS

_OFFICIAL_FORM = {fast: official for official, fast in FAST_FORMS.items()}


def use_official_layers(net: nn.Module) -> None:
    """Give every fast layer of ``net`` back its official class (the same Parameter objects, so the
    optimizers still own them)."""
    for module in net.modules():
        official = _OFFICIAL_FORM.get(type(module))
        if official is not None:
            module.__class__ = official
