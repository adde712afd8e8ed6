"""The official network's computation, rebuilt from our modules, for baselines in the benchmarks.

The official implementation's layers (its blur up- and downsampling through plain autograd, torch's
InstanceNorm2d, plain nn.Conv2d in the ResNet blocks) swapped into our networks: the same
parameters and function at the official cost. A baseline named "official" runs this.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cut.networks import Downsample, InstanceNorm, ResnetBlock, Upsample, WinogradConv2d


class OfficialDownsample(nn.Module):
    """The official blur downsampling, through plain autograd (which saves the padded input)."""

    def __init__(self, filt: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("filt", filt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class OfficialUpsample(nn.Module):
    """The official blur upsampling: replicate pad, grouped transposed conv, crop one row/column."""

    def __init__(self, filt: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("filt", filt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(
            F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=2, groups=x.shape[1]
        )
        return y[:, :, 1:-1, 1:-1]


def use_official_layers(net: nn.Module) -> None:
    """Swap in the official blur layers and torch's InstanceNorm2d (whose output is a view)."""
    for name, module in list(net.named_children()):
        if isinstance(module, Upsample):
            setattr(net, name, OfficialUpsample(module.filt))
        elif isinstance(module, Downsample):
            setattr(net, name, OfficialDownsample(module.filt))
        elif isinstance(module, InstanceNorm):
            setattr(net, name, nn.InstanceNorm2d(module.num_features))
        elif isinstance(module, WinogradConv2d):
            module.__class__ = nn.Conv2d  # same Parameter objects, so the optimizer still owns them
        else:
            if isinstance(module, ResnetBlock):  # x + conv_block(x): pad modules, then nn.Conv2d
                module.forward = lambda x, block=module: x + block.conv_block(x)
            use_official_layers(module)
