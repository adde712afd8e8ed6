"""Winograd F(2x2, 3x3) convolution for small feature maps on the CPU, forward and backward.

A 3x3 convolution computes each 2x2 output tile from a 4x4 input tile with 36 multiplications
per channel pair; Winograd's minimal filtering does it with 16, after cheap linear transforms of
the input tile, the filter and the result (Lavin & Gray, 2016; cuDNN picks the same algorithm on
GPUs). The transforms are additions of neighbouring rows and columns, run here on channels-last
copies so that every operation is contiguous along the channels; the 16 products are one batched
matrix multiply. Backward is the exact transpose of each stage, so all three passes (output,
input gradient, weight gradient) do 2.25x fewer multiplications than a direct convolution.
It pays on mid-sized feature maps (the ResNet blocks at training crops 80 to 192); on tiny maps
fixed costs dominate, on large ones the transforms are memory-bound and oneDNN's direct
convolution wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Filter transform G (4x3) of F(2x2, 3x3); the input (B^T) and output (A^T) transforms are written
# out as additions in _input_rows and _output_rows.
_G = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_GG = torch.kron(_G, _G)  # (16, 9): U[(a, b)] = sum over (r, s) of G[a, r] G[b, s] w[r, s]

#: Output height x width where Winograd beats oneDNN's direct convolution (fwd + bwd, 256 channels,
#: 2 cores): below, fixed costs dominate (16x16: 0.98x); above, memory traffic (64x64 in a step).
MIN_PIXELS = 20 * 20
MAX_PIXELS = 48 * 48


def fits(x: torch.Tensor, weight: torch.Tensor, padded: bool = True) -> bool:
    """Whether the 3x3, stride-1 convolution of ``x`` (already ``padded``, or to be reflect-padded
    by one) runs here: small even-sized float32 maps on the CPU, not under autocast (whose bf16
    convolutions go to oneDNN).
    """
    h, w = x.shape[-2:]
    if padded:
        h, w = h - 2, w - 2
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and weight.shape[-2:] == (3, 3)
        and h > 0
        and w > 0
        and h % 2 == 0
        and w % 2 == 0
        and MIN_PIXELS <= h * w <= MAX_PIXELS
    )


def every_other(x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
    """The view of ``x`` at positions start, start+2, ... along ``dim``."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, None, 2)
    return x[tuple(index)]


def _input_rows(x: torch.Tensor, dim: int, out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """B^T along ``dim``: 2t+2 input rows -> the 4 transformed rows of each of the t tiles."""
    t = (x.shape[dim] - 2) // 2
    even, odd = every_other(x, dim, 0), every_other(x, dim, 1)
    d0, d2 = even.narrow(dim, 0, t), even.narrow(dim, 1, t)
    d1, d3 = odd.narrow(dim, 0, t), odd.narrow(dim, 1, t)
    if out is None:
        return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    torch.sub(d0, d2, out=out[0])
    torch.add(d1, d2, out=out[1])
    torch.sub(d2, d1, out=out[2])
    torch.sub(d1, d3, out=out[3])
    return out


def _input_rows_adjoint(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The transpose of ``_input_rows``: overlapping tiles add into 2t+2 rows."""
    p0, p1, p2, p3 = parts
    t = p0.shape[dim]
    shape = list(p0.shape)
    shape[dim] = 2 * t + 2
    out = p0.new_zeros(shape)
    even, odd = every_other(out, dim, 0), every_other(out, dim, 1)
    even.narrow(dim, 0, t).add_(p0)
    even.narrow(dim, 1, t).add_(p1 + p2 - p0)
    odd.narrow(dim, 0, t).add_(p1 - p2 + p3)
    odd.narrow(dim, 1, t).sub_(p3)
    return out


def _output_rows(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """A^T along ``dim``: the 4 rows of each of t tiles -> 2t output rows."""
    m0, m1, m2, m3 = parts
    shape = list(m0.shape)
    shape[dim] = 2 * m0.shape[dim]
    out = m0.new_empty(shape)
    torch.add(m0 + m1, m2, out=every_other(out, dim, 0))
    torch.sub(m1 - m2, m3, out=every_other(out, dim, 1))
    return out


def _output_rows_adjoint(
    g: torch.Tensor, dim: int, out: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """The transpose of ``_output_rows``."""
    g0, g1 = every_other(g, dim, 0), every_other(g, dim, 1)
    if out is None:
        return [g0, g0 + g1, g0 - g1, -g1]
    out[0].copy_(g0)
    torch.add(g0, g1, out=out[1])
    torch.sub(g0, g1, out=out[2])
    torch.neg(g1, out=out[3])
    return out


def _input_transform(x: torch.Tensor) -> torch.Tensor:
    """(N, 2th+2, 2tw+2, C) channels-last input -> V, (16, N*th*tw, C)."""
    n, hp, wp, c = x.shape
    v = x.new_empty(16, n, (hp - 2) // 2, (wp - 2) // 2, c)
    for a, row in enumerate(_input_rows(x, 1)):
        _input_rows(row, 2, out=list(v[4 * a : 4 * a + 4]))
    return v.flatten(1, 3)


def _input_transform_adjoint(grad_v: torch.Tensor, n: int, th: int, tw: int) -> torch.Tensor:
    grads = list(grad_v.view(16, n, th, tw, -1).unbind(0))
    rows = [_input_rows_adjoint(grads[4 * a : 4 * a + 4], 2) for a in range(4)]
    return _input_rows_adjoint(rows, 1)


def _output_transform(m: torch.Tensor, n: int, th: int, tw: int) -> torch.Tensor:
    """M, (16, N*th*tw, K) -> (N, 2th, 2tw, K) channels-last output."""
    parts = list(m.view(16, n, th, tw, -1).unbind(0))
    rows = [_output_rows(parts[4 * a : 4 * a + 4], 2) for a in range(4)]
    return _output_rows(rows, 1)


def _output_transform_adjoint(grad: torch.Tensor) -> torch.Tensor:
    n, h, w, k = grad.shape
    m = grad.new_empty(16, n, h // 2, w // 2, k)
    for a, row in enumerate(_output_rows_adjoint(grad, 1)):
        _output_rows_adjoint(row, 2, out=list(m[4 * a : 4 * a + 4]))
    return m.flatten(1, 3)


def _filter_transform(weight: torch.Tensor) -> torch.Tensor:
    """(K, C, 3, 3) -> U, (16, C, K)."""
    k, c = weight.shape[:2]
    return (_GG.to(weight.dtype) @ weight.reshape(k * c, 9).T).view(16, k, c).transpose(1, 2)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def _reflect_pad(x: torch.Tensor) -> torch.Tensor:
    return F.pad(x, (1, 1, 1, 1), mode="reflect")


class _WinogradConv3x3(torch.autograd.Function):
    """Saves only its input as given: with ``reflect_pad`` that is the unpadded map, which the
    caller usually keeps anyway (a ReLU's output), so no padded copy stays alive until backward.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, reflect_pad: bool
    ) -> torch.Tensor:
        padded = _reflect_pad(x) if reflect_pad else x
        n, _, hp, wp = padded.shape
        th, tw = (hp - 2) // 2, (wp - 2) // 2
        u = _filter_transform(weight)
        out = _output_transform(torch.bmm(_input_transform(_nhwc(padded)), u), n, th, tw)
        if bias is not None:
            out.add_(bias)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.reflect_pad = bias is not None, reflect_pad
        return out.permute(0, 3, 1, 2).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        x_nhwc = _nhwc(_reflect_pad(x) if ctx.reflect_pad else x)
        n, hp, wp, c = x_nhwc.shape
        th, tw = (hp - 2) // 2, (wp - 2) // 2
        k = weight.shape[0]
        grad_nhwc = grad.permute(0, 2, 3, 1).contiguous()
        grad_b = grad_nhwc.sum((0, 1, 2)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_m = _output_transform_adjoint(grad_nhwc)  # (16, T, K)
        del grad_nhwc  # backward runs at the step's peak memory: keep few buffers alive at once
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_u = torch.bmm(_input_transform(x_nhwc).transpose(1, 2), grad_m)  # (16, C, K)
            grad_w = (_GG.to(grad_u.dtype).T @ grad_u.reshape(16, c * k)).view(3, 3, c, k)
            grad_w = grad_w.permute(3, 2, 0, 1).contiguous()
        del x_nhwc
        if ctx.needs_input_grad[0]:
            grad_v = torch.bmm(grad_m, _filter_transform(weight).transpose(1, 2))  # (16, T, C)
            del grad_m
            grad_x = _input_transform_adjoint(grad_v, n, th, tw).permute(0, 3, 1, 2).contiguous()
            if ctx.reflect_pad:
                grad_x = torch.ops.aten.reflection_pad2d_backward(grad_x, x, [1, 1, 1, 1])
        return grad_x, grad_w, grad_b, None


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, reflect_pad: bool = False
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 3x3 kernel, stride 1, where ``fits``: no padding, or
    with ``reflect_pad`` the official reflect padding of one pixel applied first.
    """
    return _WinogradConv3x3.apply(x, weight, bias, reflect_pad)
