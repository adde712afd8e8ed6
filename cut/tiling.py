"""Tiled translation that equals the whole-image output: bounded device memory at any image size.

Translating tiles on their own is wrong for CUT: every InstanceNorm normalises with statistics of
the whole image, so independent tiles differ in colour and brightness and show seams. Here the
generator runs as a sequence of *segments*, the runs of local layers between its normalisations
(convolutions, padding, blur down- and upsampling, activations). A segment is computed tile by tile
over the whole activation, each tile read with the halo its layers need, so that every output
pixel sees exactly the inputs it would see in the whole image: at the image's borders a tile's
edge is the image's edge and the layers' own padding applies; inside, the halo's pixels stand in
and the few outputs spoilt by padding at the tile's edge are cut away. While a segment's output is
written, its per-channel sums and sums of squares (float64) accumulate, and the normalisation that
follows is applied with the statistics of the whole image. Activations between segments live in
host memory; the device holds one tile of one segment at a time.

Exact up to float32 rounding: the same sums, in another order (measured in tests/test_tiling.py).
Where the host activations come from is the caller's choice (``allocate``): pipeline.spill keeps
large ones in memory-mapped files, so that host memory too stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from cut.networks import Downsample, ResnetBlock, ResnetGenerator, Upsample


@dataclass
class Segment:
    """Local layers run tile by tile: ``radius`` input pixels of halo, ``align`` the stride a tile's
    start must keep (2 per downsampling), ``scale`` output size per input size."""

    layers: list[nn.Module] = field(default_factory=list)
    radius: float = 0.0
    align: int = 1
    scale: float = 1.0

    def add(self, layer: nn.Module) -> None:
        reach, scale = _footprint(layer)
        self.radius += reach / self.scale  # in the segment's input pixels
        self.scale *= scale
        if scale < 1:
            self.align = max(self.align, round(1 / self.scale))
        self.layers.append(layer)


@dataclass
class Normalize:
    """An InstanceNorm: statistics of the whole activation, then (x - mean) / sqrt(var + eps)."""

    eps: float


@dataclass
class Save:
    """Keep the activation: a ResNet block's input, added back at its end."""


@dataclass
class AddSaved:
    """Add the activation kept by the matching Save."""


Step = Segment | Normalize | Save | AddSaved
Allocate = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def host_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The default ``Allocate``: an ordinary CPU tensor."""
    return torch.empty(shape, dtype=dtype)


def _footprint(layer: nn.Module) -> tuple[int, float]:
    """(halo in input pixels, output size per input size) of one local layer."""
    if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
        reach = (layer.kernel_size[0] - 1) // 2
        if isinstance(layer, nn.ConvTranspose2d):
            return reach, float(layer.stride[0])
        return reach, 1.0 / layer.stride[0]
    if isinstance(layer, Downsample):
        return 1, 0.5
    if isinstance(layer, Upsample):
        return 1, 2.0
    if isinstance(layer, (nn.ReflectionPad2d, nn.ReLU, nn.Tanh, nn.Identity, nn.Dropout)):
        return 0, 1.0  # a pad only makes room for the valid convolution after it; norm none is an
        # identity, and dropout works pixel by pixel (and not at all in eval mode)
    raise TypeError(f"tiled translation does not know the layer {type(layer).__name__}")


def tileable(netG: nn.Module) -> bool:
    """Whether tiled translation equals the whole-image output for ``netG``: a ResNet generator with
    instance norm (whole-image statistics, as computed here) or none. Batch norm and the U-Net are
    translated whole."""
    return isinstance(netG, ResnetGenerator) and netG.norm in ("instance", "none")


def plan_steps(netG: ResnetGenerator) -> list[Step]:
    """The generator as segments, normalisations and the ResNet blocks' skip connections."""
    if not tileable(netG):
        kind = type(netG).__name__ + (f" with norm {netG.norm}" if isinstance(netG, ResnetGenerator) else "")
        raise ValueError(f"tiled translation is exact only for a ResNet generator with instance norm (or "
                         f"none), not a {kind}: translate it whole (tile size 0)")
    steps: list[Step] = []

    def local(layer: nn.Module) -> None:
        if not steps or not isinstance(steps[-1], Segment):
            steps.append(Segment())
        steps[-1].add(layer)

    for module in netG.model:
        if isinstance(module, ResnetBlock):
            steps.append(Save())
            for layer in module.conv_block:
                if isinstance(layer, nn.InstanceNorm2d):
                    steps.append(Normalize(layer.eps))
                else:
                    local(layer)
            steps.append(AddSaved())
        elif isinstance(module, nn.InstanceNorm2d):
            steps.append(Normalize(module.eps))
        else:
            local(module)
    return steps


def _spans(size: int, tile: int) -> Iterator[tuple[int, int]]:
    for start in range(0, size, tile):
        yield start, min(size, start + tile)


def _source(start: int, stop: int, size_in: int, segment: Segment) -> tuple[int, int]:
    """The input rows (or columns) a segment reads for outputs [start, stop)."""
    halo = math.ceil(segment.radius)
    first = max(0, math.floor(start / segment.scale) - halo)
    first -= first % segment.align
    return first, min(size_in, math.ceil(stop / segment.scale) + halo)


@torch.inference_mode()
def run_segment(segment: Segment, x: torch.Tensor, tile: int, device: torch.device, with_sums: bool,
                allocate: Allocate = host_empty) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The segment over the whole (N, C, H, W) host tensor ``x``, ``tile`` output pixels a side at a
    time: its output and, ``with_sums``, the output's per-channel sum and sum of squares (N, C, 2)."""
    n, _, h, w = x.shape
    out_h, out_w = round(h * segment.scale), round(w * segment.scale)
    out: torch.Tensor | None = None
    sums: torch.Tensor | None = None
    for top, bottom in _spans(out_h, tile):
        src_top, src_bottom = _source(top, bottom, h, segment)
        for left, right in _spans(out_w, tile):
            src_left, src_right = _source(left, right, w, segment)
            # a copy even on the CPU: in-place layers (ReLU) must not write into the shared input
            y = x[:, :, src_top:src_bottom, src_left:src_right].to(device, copy=True)
            for layer in segment.layers:
                y = layer(y)
            dy, dx = round(src_top * segment.scale), round(src_left * segment.scale)
            y = y[:, :, top - dy:bottom - dy, left - dx:right - dx]
            if out is None:
                out = allocate((n, y.shape[1], out_h, out_w), y.dtype)
                sums = torch.zeros(n, y.shape[1], 2, dtype=torch.float64) if with_sums else None
            out[:, :, top:bottom, left:right] = y.to("cpu")
            if sums is not None:
                flat = y.double().flatten(2)
                sums[..., 0] += flat.sum(-1).cpu()
                sums[..., 1] += flat.square().sum(-1).cpu()
    assert out is not None
    return out, sums


@torch.inference_mode()
def _normalize(x: torch.Tensor, sums: torch.Tensor, eps: float, skip: torch.Tensor | None) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) per image and channel, in place, plus ``skip`` where given."""
    count = x.shape[-2] * x.shape[-1]
    mean = sums[..., 0] / count
    var = (sums[..., 1] / count - mean.square()).clamp(min=0)
    scale = (var + eps).rsqrt()
    shift = (-mean * scale).to(x.dtype)[..., None, None]
    scale = scale.to(x.dtype)[..., None, None]
    for c in range(x.shape[1]):  # a channel at a time: no full-size temporary
        x[:, c].mul_(scale[:, c]).add_(shift[:, c])
        if skip is not None:
            x[:, c].add_(skip[:, c])
    return x


def tiled_forward(netG: ResnetGenerator, x: torch.Tensor, tile: int, device: torch.device | str | None = None,
                  allocate: Allocate = host_empty) -> torch.Tensor:
    """netG(x) for a (N, C, H, W) CPU tensor, computed ``tile`` network pixels a side at a time on
    ``device`` (default: the generator's); the result is a CPU tensor. ``allocate(shape, dtype)``
    makes the host activations (and the result)."""
    if tile < 16 or tile % 4:
        raise ValueError(f"the tile size must be a multiple of 4 and at least 16, got {tile}")
    netG.check_input(x)
    device = torch.device(device) if device is not None else next(netG.parameters()).device
    steps = plan_steps(netG)
    x = x.cpu()
    saved: list[torch.Tensor] = []  # the input of the ResNet block being run
    sums: torch.Tensor | None = None
    level = 1.0  # output pixels per network-input pixel, per side, of the step just run
    for i, step in enumerate(steps):
        following = steps[i + 1] if i + 1 < len(steps) else None
        if isinstance(step, Segment):
            level *= step.scale
            x, sums = run_segment(step, x, max(4, round(tile * level)), device,
                                  isinstance(following, Normalize), allocate)
        elif isinstance(step, Normalize):
            assert sums is not None
            x = _normalize(x, sums, step.eps, saved[-1] if isinstance(following, AddSaved) else None)
        elif isinstance(step, Save):
            saved.append(x)
        else:  # AddSaved: the block's input was added while normalising its last output, if any
            skip = saved.pop()
            if isinstance(steps[i - 1], Segment):  # norm none: the block ends in a convolution
                with torch.inference_mode():
                    x.add_(skip)
    return x


BYTES_PER_PIXEL_PER_NGF = 16  # device memory of a whole-image forward, per input pixel and unit of ngf


def default_tile_size(netG: nn.Module, memory_bytes: int, share: float = 0.25) -> int:
    """The largest tile edge (a multiple of 64, at least 256) whose whole-image forward needs at most
    ``share`` of ``memory_bytes``: about 16 bytes per pixel per unit of ngf in float32 (1 KiB per
    pixel for ngf 64), the live activations of the widest stages. 0 (always whole images) for a
    generator that cannot be tiled exactly (``tileable``)."""
    if not tileable(netG):
        return 0
    pixels = share * memory_bytes / (BYTES_PER_PIXEL_PER_NGF * netG.ngf)
    return max(256, int(math.sqrt(pixels)) // 64 * 64)


class TiledGenerator(nn.Module):
    """``netG``, translating inputs larger than ``tile`` on a side tile by tile (exactly: see
    ``tiled_forward``); smaller inputs, and ``tile`` 0, go through ``netG`` whole."""

    def __init__(self, netG: nn.Module, tile: int, whole: nn.Module | None = None,
                 allocate: Allocate = host_empty) -> None:
        super().__init__()
        if tile:
            plan_steps(netG)  # a clear error now for a generator that cannot be tiled exactly
        self.netG, self.tile, self.allocate = netG, tile, allocate
        self.whole = whole or netG  # e.g. a compiled netG for the whole-image path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.tile or max(x.shape[-2:]) <= self.tile:
            return self.whole(x)
        return tiled_forward(self.netG, x, self.tile, x.device, self.allocate).to(x.device, copy=True)
