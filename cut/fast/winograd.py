"""Winograd convolution F(m x m, r x r) on the CPU, forward and backward.

An r x r convolution computes each m x m output tile from an a x a input tile (a = m + r - 1)
with r^2 m^2 multiplications per channel pair; Winograd's minimal filtering does it with a^2,
after cheap linear transforms of the input tile, the filter and the result (Lavin & Gray, 2016;
cuDNN and oneDNN use the same algorithm): for 3x3 kernels 2.25x fewer with m = 2, 4x with m = 4
(whose rounding error in float32 is a few times a direct convolution's: 1e-5 of the output's
scale over 256 channels); for the discriminator's 4x4 kernels 2.56x fewer with m = 2. The
4x4 tiles are used on large maps only, and never with ``CUT_WINOGRAD_TILE=2`` in the environment.
The transforms are native kernels (``cut/fast/csrc/winograd.cpp``); the a^2 products are batched
matrix multiplies. Backward is the exact transpose of each stage, so all three passes (output, input
gradient, weight gradient) save the same multiplications. A large map runs in bands of tile rows
whose transformed tiles fit ``BAND_BYTES``: the buffers are reused band after band, from the
cache, instead of a map several times the input's size (forwards without autograd run maps of up
to ``WHOLE_MAP_BYTES`` whole).

In training, a forward pass that autograd records runs oneDNN's direct convolution; only its two
backward passes, and forward passes without a graph (inference, evaluation, a flipped FastCUT
step's no-grad keys), run Winograd. Measured on one CUT step (ngf 16, 64 px, batch 1, errors
relative to the float64 step): F(4x4)'s forward rounding is 2.5-6x a direct convolution's (its
transforms have entries up to 8 and 5: 8.5e-7 vs 1.5e-7 on the first downsampling layer, 5e-6
vs 2e-6 on the PatchNCE features), and in a forward that error moves values across ReLU kinks:
one flipped ReLU in a PatchNCE head, whose rows are normalised by norms near 1e-6 at the official
init, put that head's first-layer gradients 2e-3 off (direct: 1e-6) and G's layer-4 bias 1.5e-3
(direct: 3.6e-6). The direct float32 step flips some too (0.45 per step in the query heads over 20
seeds; F(2x2) forwards 0.65, F(4x4) 1.35), each at random, so any forward that rounds otherwise,
F(2x2) included, leaves some steps' gradients up to 3e3x further off than the direct step's (3
of 8 steps tried). With the direct forward, the step's values and ReLU masks are the direct
step's exactly; the F(4x4) backward rounding moves no kink, and every applied gradient stays
within 1.7x the direct step's error (12 steps: CUT at 64 and 128 px, FastCUT at 64 px). Cost
against F(4x4) forwards, CPU time per step: +0-6% at 64-128 px crops, about +14% at 256 px (from
per-layer timings; F(2x2) forwards: +1-3%). Inference keeps F(4x4): an ngf 64 generator at 256 px
(random weights, output spread over [-1, 1]) is off by at most 2.7e-5, 0.0035 of an 8-bit step;
80 of its 196608 8-bit values differ by one from float64's (direct convolution: 13).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from cut.fast import native

#: One-pixel padding the convolution applies to its input first.
PADDING = {"none": 0, "reflect": 1, "zeros": 2}

#: Output height x width from which Winograd beats oneDNN's direct convolution (fwd + bwd, 2 cores).
MIN_PIXELS = 8 * 8

#: Output pixels (batch x height x width) from which 4x4 output tiles beat 2x2 ones: the 4x4
#: tiles' products are fewer but smaller matrix multiplies (2 cores: 1.1x slower at 1 x 16x16 and
#: 1 x 32x32, 1.2x faster at 2 x 32x32, 1.6x at 2 x 64x64).
TILE4_MIN_PIXELS = 2 * 32 * 32

#: Bytes of transformed tiles (positions x channels x tiles) per band.
BAND_BYTES = 4 << 20

#: A forward pass without autograd runs a map whose transformed tiles fit in this many bytes as one
#: band: one matrix multiply per tile position over all the tiles, which the BLAS runs faster, and
#: the transformed filter read once rather than once per band (the ResNet blocks at a 256x256 input,
#: 9 MiB: their products 9-14% faster in place, medians of 8 alternating forwards on 2 cores; on
#: larger maps, bands of BAND_BYTES stay faster). Outputs are the same: no tile's arithmetic
#: depends on its band.
WHOLE_MAP_BYTES = 16 << 20


def fits(x: torch.Tensor, weight: torch.Tensor, padding: str = "none") -> bool:
    """Whether the 3x3 or 4x4, stride-1 convolution of ``x`` (padded by one pixel first unless
    ``padding`` is "none") runs here: float32 maps on the CPU, not under autocast (whose bf16
    convolutions go to oneDNN), where the native kernels are available.
    """
    grow = (0 if padding == "none" else 2) - weight.shape[-1] + 1  # output size - input size
    h, w = x.shape[-2] + grow, x.shape[-1] + grow
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and weight.shape[-1] == weight.shape[-2] in (3, 4)
        and min(h, w) >= 2
        and h * w >= MIN_PIXELS
        and native.available()
    )


def output_tile(n: int, oh: int, ow: int, kernel: int = 3) -> int:
    """The output tile side m for n outputs of oh x ow (always 2 for 4x4 kernels)."""
    if kernel != 3 or os.environ.get("CUT_WINOGRAD_TILE") == "2":
        return 2
    return 4 if n * oh * ow >= TILE4_MIN_PIXELS else 2


def _bands(th: int, tiles_per_row: int, values_per_tile: int, itemsize: int) -> list[tuple[int, int]]:
    """(first tile row, rows) of each band."""
    rows = max(1, min(th, BAND_BYTES // (values_per_tile * tiles_per_row * itemsize)))
    return [(ty0, min(rows, th - ty0)) for ty0 in range(0, th, rows)]


class _Plan:
    """The tiling of one convolution: tile side, grid, bands and their buffers (one band where the
    whole map's transformed tiles fit in ``whole_map_bytes``)."""

    def __init__(
        self, x: torch.Tensor, weight: torch.Tensor, pad: int, tile: int | None = None,
        whole_map_bytes: int = 0,
    ) -> None:
        (n, c, h, w), k, self.r = x.shape, weight.shape[0], weight.shape[-1]
        self.hp, self.wp = (h + 2, w + 2) if pad else (h, w)
        self.oh, self.ow = self.hp - self.r + 1, self.wp - self.r + 1
        self.m = tile or output_tile(n, self.oh, self.ow, self.r)
        self.th, self.tw = -(-self.oh // self.m), -(-self.ow // self.m)
        self.positions = (self.m + self.r - 1) ** 2
        self.row_tiles = n * self.tw
        values_per_tile = self.positions * max(c, k)
        if values_per_tile * self.th * self.row_tiles * x.element_size() <= whole_map_bytes:
            self.bands = [(0, self.th)]
        else:
            self.bands = _bands(self.th, self.row_tiles, values_per_tile, x.element_size())
        self._most = self.bands[0][1] * self.row_tiles

    def buffer(self, like: torch.Tensor, channels: int) -> torch.Tensor:
        return like.new_empty(self.positions * channels * self._most)

    def band(self, buffer: torch.Tensor, channels: int, rows: int) -> torch.Tensor:
        tiles = rows * self.row_tiles
        return buffer[: self.positions * channels * tiles].view(self.positions, channels, tiles)


def _transformed_filter(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The filter transform of `weight`. For a frozen weight (``requires_grad`` off) under inference
    mode it is computed once per weight and tile, keyed by the tensor's version counter; otherwise
    each call computes it. A weight that requires grad is being trained, and the version counter
    cannot tell: fused Adam (``fused=True``) updates parameters in place without bumping it, and a
    cached transform would evaluate a training run's generator with stale filters."""
    if not torch.is_inference_mode_enabled() or weight.requires_grad:
        return torch.ops.cut_native.winograd_filter_transform(weight, m)
    key = (weight.data_ptr(), weight._version, m)
    cached = getattr(weight, "_cut_winograd_filter", None)  # lives and dies with the weight
    if cached is None or cached[0] != key:
        cached = (key, torch.ops.cut_native.winograd_filter_transform(weight, m))
        weight._cut_winograd_filter = cached  # type: ignore[attr-defined]
    return cached[1]


def _direct_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: str
) -> torch.Tensor:
    """The convolution as ``nn.Conv2d`` (and the ResNet blocks' reflect pad) compute it: oneDNN."""
    if padding == "reflect":
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, bias)
    return F.conv2d(x, weight, bias, 1, 1 if padding == "zeros" else 0)


class _WinogradConv2d(torch.autograd.Function):
    """Saves only its input as given: when it pads, that is the unpadded map, which the caller
    usually keeps anyway (a ReLU's output), so no padded copy stays alive until backward. A forward
    that autograd records (``recorded``) and no ``tile`` forces is the direct convolution's, the
    backward Winograd's (see the module docstring).
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        padding: str,
        tile: int | None,
        recorded: bool,
    ) -> torch.Tensor:
        ctx.has_bias, ctx.pad, ctx.tile = bias is not None, PADDING[padding], tile
        if recorded and tile is None:
            ctx.save_for_backward(x, weight)
            return _direct_conv2d(x, weight, bias, padding)
        ops, pad = torch.ops.cut_native, ctx.pad
        x, weight = x.contiguous(), weight.contiguous()
        bias = None if bias is None else bias.contiguous()
        (n, c), k = x.shape[:2], weight.shape[0]
        plan = _Plan(x, weight, pad, tile, WHOLE_MAP_BYTES)
        u = _transformed_filter(weight, plan.m)  # (P, K, C)
        out = x.new_empty(n, k, plan.oh, plan.ow)
        v_buf, m_buf = plan.buffer(x, c), plan.buffer(x, k)
        for ty0, rows in plan.bands:
            v, m = plan.band(v_buf, c, rows), plan.band(m_buf, k, rows)
            ops.winograd_input_transform(x, plan.m, plan.r, pad, ty0, v)
            torch.bmm(u, v, out=m)
            ops.winograd_output_transform(m, plan.m, plan.r, bias, ty0, out)
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ops, pad = torch.ops.cut_native, ctx.pad
        x, weight = (t.contiguous() for t in ctx.saved_tensors)
        (n, c), k = x.shape[:2], weight.shape[0]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        grad_b = grad.sum((0, 2, 3)) if ctx.has_bias and need_b else None
        plan = _Plan(x, weight, pad, ctx.tile)
        gm_buf = plan.buffer(x, k)
        if need_w:
            v_buf, grad_u = plan.buffer(x, c), x.new_empty(plan.positions, k, c)
        if need_x:
            gv_buf, u_t = plan.buffer(x, c), ops.winograd_filter_transform(weight, plan.m).transpose(1, 2)
            grad_ext = x.new_empty(n, c, plan.m * plan.th + plan.r - 1, plan.m * plan.tw + plan.r - 1)
        for ty0, rows in plan.bands:
            gm = plan.band(gm_buf, k, rows)
            ops.winograd_output_transform_adjoint(grad, plan.m, plan.r, ty0, gm)
            if need_w:
                v = plan.band(v_buf, c, rows)
                ops.winograd_input_transform(x, plan.m, plan.r, pad, ty0, v)
                if ty0 == 0:
                    torch.bmm(gm, v.transpose(1, 2), out=grad_u)
                else:
                    grad_u.baddbmm_(gm, v.transpose(1, 2))
            if need_x:
                gv = torch.bmm(u_t, gm, out=plan.band(gv_buf, c, rows))
                ops.winograd_input_transform_adjoint(gv, plan.m, plan.r, ty0, grad_ext)
        grad_w = ops.winograd_filter_transform_adjoint(grad_u, plan.m, plan.r) if need_w else None
        grad_x = None
        if need_x:
            grad_padded = grad_ext[:, :, : plan.hp, : plan.wp]
            if pad == PADDING["reflect"]:
                grad_x = torch.ops.aten.reflection_pad2d_backward(grad_padded, x, [1, 1, 1, 1])
            elif pad == PADDING["zeros"]:
                grad_x = grad_padded[:, :, 1:-1, 1:-1]
            else:
                grad_x = grad_padded
        return grad_x, grad_w, grad_b, None, None, None


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    padding: str = "none",
    tile: int | None = None,
) -> torch.Tensor:
    """``F.conv2d(x, weight, bias)`` for a 3x3 or 4x4 kernel, stride 1, where ``fits`` (or in
    float64, for tests), after one pixel of ``padding``: "none", "reflect" (the ResNet blocks) or
    "zeros" (``padding=1``). ``tile`` (2, or 4 for 3x3 kernels) overrides :func:`output_tile`, and
    makes a recorded forward Winograd's too.
    """
    if padding not in PADDING:
        raise ValueError(f"padding must be one of {sorted(PADDING)}, got {padding!r}")
    if tile not in (None, 2, 4) or (tile == 4 and weight.shape[-1] != 3):
        raise ValueError(f"tile must be 2, or 4 for 3x3 kernels, got {tile!r}")
    if not native.available():
        raise RuntimeError("cut.fast.winograd needs the native CPU kernels (see cut.fast.native)")
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return _WinogradConv2d.apply(x, weight, bias, padding, tile, recorded)
