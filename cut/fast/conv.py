"""Fast forms of the official stride-1 convolutions and of the ResNet block around them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cut.fast import plain, winograd
from cut.networks import ResnetBlock


class WinogradConv2d(nn.Conv2d):
    """A stride-1 3x3 or 4x4 convolution, unpadded or zero-padded by one: the generator's (in
    the ResNet blocks after a reflect pad; in the down- and upsampling stages) and the
    discriminator's hidden layers. On the CPU in float32 it runs as a Winograd convolution
    (``cut.fast.winograd``), which computes the same convolution with 2.25-4x fewer multiplications
    in both backward passes and in forward passes without autograd (a forward that autograd
    records stays oneDNN's, for the gradients' accuracy); elsewhere (autocast, and GPUs, whose
    cuDNN makes its own choice) as ``nn.Conv2d``. Parameters and their names are nn.Conv2d's.
    """

    def __init__(self, c_in: int, c_out: int, kernel_size: int = 3, padding: int = 0) -> None:
        super().__init__(c_in, c_out, kernel_size=kernel_size, stride=1, padding=padding, bias=True)

    def _conv_forward(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        padding = "zeros" if self.padding == (1, 1) else "none"
        if self._winograd(x, padding):
            return winograd.conv2d(x, weight, bias, padding)
        return super()._conv_forward(x, weight, bias)

    def _trains(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)

    def _winograd(self, x: torch.Tensor, padding: str) -> bool:
        return (
            self.padding_mode == "zeros"
            and self.padding in ((0, 0), (1, 1))
            and not plain.exporting()
            and winograd.fits(x, self.weight, padding)
        )

    def padded_forward(self, x: torch.Tensor, pad: nn.Module) -> torch.Tensor:
        """``self(pad(x))`` for an unpadded 3x3 convolution, keeping only the unpadded ``x``
        (usually alive anyway) for backward.
        """
        reflect_1 = isinstance(pad, nn.ReflectionPad2d) and pad.padding == (1, 1, 1, 1)
        unpadded_3x3 = self.padding == (0, 0) and self.kernel_size == (3, 3)
        if not reflect_1 or not unpadded_3x3 or torch.is_autocast_enabled(x.device.type) or plain.exporting():
            return self(pad(x))
        if self._winograd(x, "reflect"):
            return winograd.conv2d(x, self.weight, self.bias, "reflect")
        if self._trains(x):
            return _ReflectPadConv.apply(x, self.weight, self.bias)
        return self(pad(x))


class _ReflectPadConv(torch.autograd.Function):
    """conv2d(reflect_pad(x, 1), weight, bias) that saves ``x`` rather than its padded copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_padded, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad, padded, weight, [weight.shape[0]], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
            [need_x, need_w, need_b],
        )
        del padded
        grad_x = torch.ops.aten.reflection_pad2d_backward(grad_padded, x, [1, 1, 1, 1]) if need_x else None
        return grad_x, grad_w, grad_b


class FusedPadResnetBlock(ResnetBlock):
    """``ResnetBlock`` whose two reflect pads run inside their convolutions
    (``WinogradConv2d.padded_forward``), so no padded copy of a map is kept for backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad1, conv1, *middle, pad2, conv2, norm2 = self.conv_block
        h = conv1.padded_forward(x, pad1)
        for layer in middle:  # norm, ReLU and any dropout
            h = layer(h)
        return x + norm2(conv2.padded_forward(h, pad2))
