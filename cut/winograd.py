"""Winograd F(2x2, 3x3) convolution on the CPU, forward and backward.

A 3x3 convolution computes each 2x2 output tile from a 4x4 input tile with 36 multiplications
per channel pair; Winograd's minimal filtering does it with 16, after cheap linear transforms of
the input tile, the filter and the result (Lavin & Gray, 2016; cuDNN picks the same algorithm on
GPUs). The transforms are native kernels (``cut/csrc/winograd.cpp``); the 16 products are batched
matrix multiplies. Backward is the exact transpose of each stage, so all three passes (output,
input gradient, weight gradient) do 2.25x fewer multiplications than a direct convolution.
A large map runs in bands of tile rows whose transformed tiles fit ``BAND_BYTES``: the buffers
are reused band after band, from the cache, instead of a map four times the input's size.
"""

from __future__ import annotations

import torch

from cut import native

#: One-pixel padding the convolution applies to its input first.
PADDING = {"none": 0, "reflect": 1, "zeros": 2}

#: Output height x width from which Winograd beats oneDNN's direct convolution (fwd + bwd, 2 cores).
MIN_PIXELS = 8 * 8

#: Bytes of transformed tiles (16 x channels x tiles) per band.
BAND_BYTES = 4 << 20


def fits(x: torch.Tensor, weight: torch.Tensor, padding: str = "none") -> bool:
    """Whether the 3x3, stride-1 convolution of ``x`` (padded by one pixel first unless
    ``padding`` is "none") runs here: even-sized float32 maps on the CPU, not under autocast
    (whose bf16 convolutions go to oneDNN), where the native kernels are available.
    """
    h, w = x.shape[-2:]
    if padding == "none":
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
        and h * w >= MIN_PIXELS
        and native.available()
    )


def every_other(x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
    """The view of ``x`` at positions start, start+2, ... along ``dim``."""
    index = [slice(None)] * x.dim()
    index[dim] = slice(start, None, 2)
    return x[tuple(index)]


def _bands(th: int, tiles_per_row: int, channels: int, itemsize: int) -> list[tuple[int, int]]:
    """(first tile row, rows) of each band."""
    rows = max(1, min(th, BAND_BYTES // (16 * channels * tiles_per_row * itemsize)))
    return [(ty0, min(rows, th - ty0)) for ty0 in range(0, th, rows)]


def _buffer(like: torch.Tensor, channels: int, tiles: int) -> torch.Tensor:
    return like.new_empty(16 * channels * tiles)


def _band(buffer: torch.Tensor, channels: int, tiles: int) -> torch.Tensor:
    return buffer[: 16 * channels * tiles].view(16, channels, tiles)


class _WinogradConv3x3(torch.autograd.Function):
    """Saves only its input as given: when it pads, that is the unpadded map, which the caller
    usually keeps anyway (a ReLU's output), so no padded copy stays alive until backward.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: str
    ) -> torch.Tensor:
        ops, pad = torch.ops.cut_native, PADDING[padding]
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        (n, c, h, w), k = x.shape, weight.shape[0]
        hp, wp = (h, w) if pad == 0 else (h + 2, w + 2)
        th, tw = (hp - 2) // 2, (wp - 2) // 2
        u = ops.winograd_filter_transform(weight)  # (16, K, C)
        out = x.new_empty(n, k, 2 * th, 2 * tw)
        bands = _bands(th, n * tw, max(c, k), x.element_size())
        most = bands[0][1] * n * tw
        v_buf, m_buf = _buffer(x, c, most), _buffer(x, k, most)
        for ty0, rows in bands:
            v, m = _band(v_buf, c, rows * n * tw), _band(m_buf, k, rows * n * tw)
            ops.winograd_input_transform(x, pad, ty0, v)
            torch.bmm(u, v, out=m)
            ops.winograd_output_transform(m, bias, ty0, out)
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.pad = bias is not None, pad
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ops, pad = torch.ops.cut_native, ctx.pad
        x, weight = ctx.saved_tensors
        (n, c), k = x.shape[:2], weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        th, tw = grad.shape[2] // 2, grad.shape[3] // 2
        grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
        bands = _bands(th, n * tw, max(c, k), x.element_size())
        most = bands[0][1] * n * tw
        gm_buf = _buffer(x, k, most)
        if need_w:
            v_buf, grad_u = _buffer(x, c, most), x.new_zeros(16, k, c)
        if need_x:
            gv_buf, u_t = _buffer(x, c, most), ops.winograd_filter_transform(weight).transpose(1, 2)
            grad_padded = x.new_zeros(n, c, 2 * th + 2, 2 * tw + 2)
        for ty0, rows in bands:
            tiles = rows * n * tw
            gm = _band(gm_buf, k, tiles)
            ops.winograd_output_transform_adjoint(grad, ty0, gm)
            if need_w:
                v = _band(v_buf, c, tiles)
                ops.winograd_input_transform(x, pad, ty0, v)
                grad_u.baddbmm_(gm, v.transpose(1, 2))
            if need_x:
                gv = torch.bmm(u_t, gm, out=_band(gv_buf, c, tiles))
                ops.winograd_input_transform_adjoint(gv, ty0, grad_padded)
        grad_w = ops.winograd_filter_transform_adjoint(grad_u) if need_w else None
        grad_x = None
        if need_x:
            if pad == PADDING["reflect"]:
                grad_x = torch.ops.aten.reflection_pad2d_backward(grad_padded, x, [1, 1, 1, 1])
            elif pad == PADDING["zeros"]:
                grad_x = grad_padded[:, :, 1:-1, 1:-1]
            else:
                grad_x = grad_padded
        return grad_x, grad_w, grad_b, None


def conv3x3(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, padding: str = "none"
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 3x3 kernel, stride 1, where ``fits`` (or in float64,
    for tests), after one pixel of ``padding``: "none", "reflect" (the ResNet blocks) or "zeros"
    (``padding=1``).
    """
    if padding not in PADDING:
        raise ValueError(f"padding must be one of {sorted(PADDING)}, got {padding!r}")
    if not native.available():
        raise RuntimeError("cut.winograd needs the native CPU kernels (see cut.native)")
    return _WinogradConv3x3.apply(x, weight, bias, padding)
