"""Fast forms of the official layers, swapped into a built network by :func:`accelerate`.

``cut.networks`` builds the networks as the paper and the official code describe them. Each class
here subclasses one official layer and overrides only its forward, computing the same function
faster (on the CPU above all): the blur resampling as separable passes or bilinear interpolation
(``blur``), InstanceNorm as a group norm (``norm``), the stride-1 3x3/4x4 convolutions as Winograd
convolutions with native transforms (``conv``, ``winograd``, ``native``, ``csrc/``). Swapping a
layer's class keeps its parameters, buffers and state-dict keys, so checkpoints are the same
either way and optimizers keep owning the same tensors. Under a tracer or exporter, and inside
``plain_operators``, the fast layers run the official operators (``plain``).
"""

from __future__ import annotations

from torch import nn

from cut.fast.blur import BilinearUpsample, BlurDownsample
from cut.fast.conv import FusedPadResnetBlock, WinogradConv2d
from cut.fast.norm import GroupNormInstanceNorm
from cut.networks import Downsample, NLayerDiscriminator, ResnetBlock, ResnetGenerator, Upsample

__all__ = ["FAST_FORMS", "accelerate"]

#: Official layer -> its fast form. Convolutions are swapped only where ``_winograd_convs`` picks them.
FAST_FORMS: dict[type[nn.Module], type[nn.Module]] = {
    Downsample: BlurDownsample,
    Upsample: BilinearUpsample,
    nn.InstanceNorm2d: GroupNormInstanceNorm,
    ResnetBlock: FusedPadResnetBlock,
    nn.Conv2d: WinogradConv2d,
}


def _winograd_convs(module: nn.Module) -> list[nn.Module]:
    """The convolutions of ``module`` (not of its submodules) that run as Winograd convolutions: a
    ResNet block's two, the generator's stride-1 3x3 resampling convolutions, the discriminator's
    stride-1 hidden ones (its input and output convolutions, 3 and 1 channels wide, are too thin
    for Winograd to pay)."""
    if isinstance(module, ResnetBlock):
        return [m for m in module.conv_block if type(m) is nn.Conv2d]
    if isinstance(module, ResnetGenerator):
        return [m for m in module.model
                if type(m) is nn.Conv2d and m.kernel_size == (3, 3) and m.stride == (1, 1)]
    if isinstance(module, NLayerDiscriminator):
        convs = [m for m in module.model if isinstance(m, nn.Conv2d)][1:-1]
        return [m for m in convs if type(m) is nn.Conv2d and m.stride == (1, 1)]
    return []


def accelerate(net: nn.Module) -> nn.Module:
    """``net`` with every official layer that has a fast form (``FAST_FORMS``) swapped for it, in
    place: the same parameters, buffers and state-dict keys, the same function. Returns ``net``."""
    for module in list(net.modules()):
        for conv in _winograd_convs(module):
            conv.__class__ = WinogradConv2d
        fast = FAST_FORMS.get(type(module))
        if fast is None or fast is WinogradConv2d:
            continue
        if fast is GroupNormInstanceNorm and (module.affine or module.track_running_stats):
            continue  # only the official norm (no affine, no running stats) has this fast form
        module.__class__ = fast
    return net
