"""Fast forms of the official blur resampling layers (``cut.networks.Downsample`` / ``Upsample``):
the same function and ``filt`` buffer, cheaper arithmetic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cut.fast import plain
from cut.networks import Downsample, Upsample


def every_other(x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
    """The view of ``x`` at positions start, start+2, ... along ``dim``."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, None, 2)
    return x[tuple(index)]


def _blur_stride2(x: torch.Tensor, dim: int) -> torch.Tensor:
    """[1,2,1]/4 along ``dim`` after a reflect pad of 1, every second output kept.

    Output i is x[2i-1]/4 + x[2i]/2 + x[2i+1]/4, reading x[-1] as x[1] and x[n] as x[n-2].
    """
    n = x.shape[dim]
    n_out, n_odd = (n + 1) // 2, n // 2
    odd = every_other(x, dim, 1)
    out = every_other(x, dim, 0) * 0.5
    out.narrow(dim, 1, n_out - 1).add_(odd.narrow(dim, 0, n_out - 1), alpha=0.25)  # left neighbours
    out.narrow(dim, 0, 1).add_(odd.narrow(dim, 0, 1), alpha=0.25)  # reflected x[-1] = x[1]
    out.narrow(dim, 0, n_odd).add_(odd, alpha=0.25)  # right neighbours
    if n % 2:  # reflected x[n] = x[n-2]
        out.narrow(dim, n_out - 1, 1).add_(odd.narrow(dim, n_odd - 1, 1), alpha=0.25)
    return out


def _blur_stride2_adjoint(grad: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """The transpose of ``_blur_stride2`` for an input of length ``n`` along ``dim``."""
    n_out, n_odd = (n + 1) // 2, n // 2
    shape = list(grad.shape)
    shape[dim] = n
    out = grad.new_empty(shape)
    odd = every_other(out, dim, 1)
    torch.mul(grad, 0.5, out=every_other(out, dim, 0))
    torch.mul(grad.narrow(dim, 0, n_odd), 0.25, out=odd)
    odd.narrow(dim, 0, n_out - 1).add_(grad.narrow(dim, 1, n_out - 1), alpha=0.25)
    odd.narrow(dim, 0, 1).add_(grad.narrow(dim, 0, 1), alpha=0.25)
    if n % 2:
        odd.narrow(dim, n_odd - 1, 1).add_(grad.narrow(dim, n_out - 1, 1), alpha=0.25)
    return out


class _SeparableBlur(torch.autograd.Function):
    """Reflect pad 1, then the [1,2,1] x [1,2,1] / 16 blur with stride 2, run as two separable passes.

    The official layer is a depthwise 3x3 convolution; the separable form computes the same sums
    (the weights are powers of two, so only the order of additions differs) with a fraction of the
    memory traffic, and its backward is the exact transpose, needing no saved activation.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.size = x.shape[-2:]
        return _blur_stride2(_blur_stride2(x, -2), -1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        h, w = ctx.size
        return _blur_stride2_adjoint(_blur_stride2_adjoint(grad.contiguous(), w, -1), h, -2)


class BlurDownsample(Downsample):
    """``Downsample`` as two separable stride-2 passes; tracers, exporters and ``plain_operators``
    get the official depthwise convolution, which every exporter keeps and autograd differentiates
    twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if plain.exporting():
            return super().forward(x)
        self.check_input(x)
        return _SeparableBlur.apply(x)


class BilinearUpsample(Upsample):
    """``Upsample`` as bilinear 2x interpolation (``align_corners=False``), which is what the
    official layer (replicate pad 1, depthwise transposed conv with stride 2 and padding 2, one row
    and column cropped on each side) computes, at a fraction of a grouped transposed conv's cost.
    Exports record this form too: interpolation is a plain operator."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
