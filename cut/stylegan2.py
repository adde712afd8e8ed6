"""The StyleGAN2-based generator and discriminator of the official SinCUT (``--netG stylegan2``,
``--netD stylegan2``).

Attribute names, module indices and buffers follow the official modules, so an official SinCUT
``latest_net_G.pth`` / ``latest_net_D.pth`` loads with ``strict=True`` (docs/official-reference.md,
section "SinCUT"). The SinCUT generator has no style input: every modulated convolution sees a style
of ones, so only the equalized-lr scaling and the weight demodulation remain of StyleGAN2's
modulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cut.networks import check_generator_input

SQRT2 = math.sqrt(2.0)
BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
RESOLUTIONS = tuple(2**i for i in range(2, 11))  # 4 ... 1024, the keys of the official channel tables
GENERATOR_VARIANTS = {"stylegan2": 6, "smallstylegan2": 2}  # netG name -> n_blocks (models/networks.py)
INFERENCE_NOISE_SEED = 0  # the decoder's noise when a loaded generator translates (StyleGAN2Generator)


# ------------------------------------------------------------------------------------- sizes
def _base_width(resolution: int) -> int:
    """The channel count before the width multiplier: 4096 at 4x4, halving per doubling of size."""
    return 16384 // resolution


def generator_channels(ngf: int) -> dict[int, int]:
    """Channels per resolution of the SinCUT generator: ``round(base * ngf / 32)``, at most 512 up
    to 32x32 (official ``StyleGAN2Encoder`` / ``StyleGAN2Decoder``)."""
    out = {}
    for res in RESOLUTIONS:
        width = round(_base_width(res) * ngf / 32)
        out[res] = min(512, width) if res <= 32 else width
    return out


def discriminator_channels(ndf: int) -> dict[int, int]:
    """Channels per resolution of the discriminator: ``int(base * ndf / 64)``, at most 384 up to
    32x32 (official ``StyleGAN2Discriminator``)."""
    out = {}
    for res in RESOLUTIONS:
        width = int(_base_width(res) * ndf / 64)
        out[res] = min(384, width) if res <= 32 else width
    return out


def network_resolution(load_size: int, crop_size: int) -> int:
    """The power of two nearest to ``min(load_size, crop_size)`` in log scale: the size the official
    networks are built for."""
    side = min(load_size, crop_size)
    if side < 1:
        raise ValueError(f"load_size and crop_size must be positive, got {load_size} and {crop_size}")
    return 2 ** round(math.log2(side))


# ------------------------------------------------------------------------------ basic layers
def fused_leaky_relu(
    x: torch.Tensor, bias: torch.Tensor, negative_slope: float = 0.2, gain: float = SQRT2
) -> torch.Tensor:
    """``gain * leaky_relu(x + bias)``: StyleGAN2's bias-and-activation, gain sqrt(2) by default."""
    return F.leaky_relu(x + bias, negative_slope) * gain


class FusedLeakyReLU(nn.Module):
    """A learned per-channel bias (shape 1 x C x 1 x 1, zero at start) then the scaled leaky ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


def blur_kernel(taps: Sequence[float] = BLUR_TAPS, gain: float = 1.0) -> torch.Tensor:
    """The 2-D kernel ``outer(taps, taps)``, normalised to sum to ``gain``."""
    a = torch.tensor(taps, dtype=torch.float32)
    kernel = a[:, None] * a[None, :]
    return kernel / kernel.sum() * gain


class Blur(nn.Module):
    """Zero-pad ``pad = (before, after)`` on both spatial axes, then a depthwise FIR filter.

    Equals the official ``upfirdn2d`` with up = down = 1 (it correlates with the flipped kernel;
    the kernel is symmetric). The kernel is a persistent buffer named ``kernel``, as officially.
    """

    def __init__(self, pad: tuple[int, int], gain: float = 1.0) -> None:
        super().__init__()
        self.pad = pad
        self.register_buffer("kernel", blur_kernel(BLUR_TAPS, gain))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before, after = self.pad
        channels = int(x.shape[1])  # a constant when traced: exporters need the kernel's shape
        weight = self.kernel.flip(0, 1).to(x.dtype)[None, None].expand(channels, 1, *self.kernel.shape)
        return F.conv2d(F.pad(x, (before, after, before, after)), weight, groups=channels)


class EqualConv2d(nn.Module):
    """A convolution with equalized learning rate: weights drawn N(0, 1) and multiplied by
    1 / sqrt(fan_in) at every call; the optional bias starts at zero."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, stride: int = 1, padding: int = 0, bias: bool = True
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel_size, kernel_size))
        self.scale = 1.0 / math.sqrt(c_in * kernel_size**2)
        self.stride = stride
        self.padding = padding
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, self.bias, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """A linear layer with equalized learning rate (scale ``lr_mul / sqrt(fan_in)``), optionally
    followed by the fused leaky ReLU, which then takes the bias."""

    def __init__(
        self, in_dim: int, out_dim: int, activation: bool = False, bias_init: float = 0.0, lr_mul: float = 1.0
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim).div_(lr_mul))
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ConvLayer(nn.Sequential):
    """[Blur] + EqualConv2d + [FusedLeakyReLU], indexed as officially.

    With ``downsample`` the blur pads so that the stride-2 convolution halves an even size exactly.
    An activated layer puts its bias in the activation, so its convolution has none.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        kernel_size: int,
        downsample: bool = False,
        bias: bool = True,
        activate: bool = True,
    ) -> None:
        layers: list[nn.Module] = []
        if downsample:
            extra = len(BLUR_TAPS) - 2 + kernel_size - 1
            layers.append(Blur(((extra + 1) // 2, extra // 2)))
            stride, padding = 2, 0
        else:
            stride, padding = 1, kernel_size // 2
        layers.append(EqualConv2d(c_in, c_out, kernel_size, stride, padding, bias=bias and not activate))
        if activate:
            if not bias:
                raise ValueError(
                    "an activated ConvLayer without bias (ScaledLeakyReLU) is not used by SinCUT"
                )
            layers.append(FusedLeakyReLU(c_out))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """(conv2(conv1(x)) + skip(x)) / sqrt(2); the skip is a bias-free 1x1 ConvLayer when the block
    changes width or downsamples, else the identity."""

    def __init__(self, c_in: int, c_out: int, downsample: bool = True) -> None:
        super().__init__()
        self.conv1 = ConvLayer(c_in, c_in, 3)
        self.conv2 = ConvLayer(c_in, c_out, 3, downsample=downsample)
        if c_in != c_out or downsample:
            self.skip: nn.Module = ConvLayer(
                c_in, c_out, 1, downsample=downsample, bias=False, activate=False
            )
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.conv2(self.conv1(x)) + self.skip(x)) / SQRT2


class DemodulatedConv2d(nn.Module):
    """The official ``ModulatedConv2d`` with no style (SinCUT's decoder): weight (1, out, in, k, k)
    scaled by 1 / sqrt(fan_in), each output filter demodulated to unit norm (eps 1e-8 inside the
    square root). With ``upsample``: a stride-2 transposed convolution, then a [1,3,3,1] blur
    (kernel sum 4, pad 1 each side), giving exactly twice the input size."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, upsample: bool = False, demodulate: bool = True
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.upsample = upsample
        self.demodulate = demodulate
        if upsample:
            extra = len(BLUR_TAPS) - 2 - (kernel_size - 1)
            self.blur = Blur(((extra + 1) // 2 + 1, extra // 2 + 1), gain=4.0)
        self.scale = 1.0 / math.sqrt(c_in * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.randn(1, c_out, c_in, kernel_size, kernel_size))

    def effective_weight(self) -> torch.Tensor:
        """The (out, in, k, k) filter actually applied."""
        weight = self.scale * self.weight[0]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight().to(x.dtype)
        if self.upsample:
            return self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        return F.conv2d(x, weight, padding=self.padding)


class NoiseInjection(nn.Module):
    """x + weight * N(0, 1) noise, one noise channel broadcast over all channels; weight starts at 0."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, shared: bool = False
    ) -> torch.Tensor:
        """``shared``: one noise map for every image of the batch (inference: an image's output does
        not depend on its place in the batch)."""
        shape = (1 if shared else x.shape[0], 1, x.shape[2], x.shape[3])
        if generator is None:
            noise = torch.randn(shape, device=x.device, dtype=x.dtype)
        else:
            noise = torch.randn(shape, generator=generator, device=generator.device, dtype=x.dtype).to(
                x.device
            )
        return x + self.weight * noise


class StyledConv(nn.Module):
    """DemodulatedConv2d, optional noise injection (the module and its weight exist either way, as
    officially), then the fused leaky ReLU."""

    def __init__(
        self, c_in: int, c_out: int, kernel_size: int, upsample: bool = False, inject_noise: bool = True
    ) -> None:
        super().__init__()
        self.inject_noise = inject_noise
        self.conv = DemodulatedConv2d(c_in, c_out, kernel_size, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(c_out)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, shared: bool = False
    ) -> torch.Tensor:
        out = self.conv(x)
        if self.inject_noise:
            out = self.noise(out, generator, shared)
        return self.activate(out)


# ---------------------------------------------------------------------------------- networks
def _checked_resolution(resolution: int, what: str) -> int:
    if resolution not in RESOLUTIONS:
        raise ValueError(f"{what}: resolution {resolution} is not a power of two in 4..1024")
    return resolution


class StyleGAN2Encoder(nn.Module):
    """``convs``: identity (so layer 0 is the input image), a 1x1 ConvLayer, ``num_downsampling``
    downsampling ResBlocks, then ``n_blocks // 2`` ResBlocks at the lowest resolution."""

    def __init__(
        self, input_nc: int, ngf: int, n_blocks: int, num_downsampling: int, resolution: int
    ) -> None:
        super().__init__()
        channels = generator_channels(ngf)
        res = resolution
        modules: list[nn.Module] = [nn.Identity(), ConvLayer(input_nc, channels[res], 1)]
        self.out_channels = [input_nc, channels[res]]
        for _ in range(num_downsampling):
            modules.append(ResBlock(channels[res], channels[res // 2], downsample=True))
            res //= 2
            self.out_channels.append(channels[res])
        for _ in range(n_blocks // 2):
            modules.append(ResBlock(channels[res], channels[res], downsample=False))
            self.out_channels.append(channels[res])
        self.convs = nn.Sequential(*modules)


class StyleGAN2Decoder(nn.Module):
    """``convs``: ``n_blocks // 2`` ResBlocks, ``num_downsampling`` upsampling StyledConvs, then a
    1x1 ConvLayer to ``output_nc`` channels with the fused leaky ReLU (no tanh: outputs are not
    bounded to [-1, 1])."""

    def __init__(
        self,
        output_nc: int,
        ngf: int,
        n_blocks: int,
        num_downsampling: int,
        resolution: int,
        inject_noise: bool,
    ) -> None:
        super().__init__()
        channels = generator_channels(ngf)
        res = resolution // 2**num_downsampling
        modules: list[nn.Module] = [
            ResBlock(channels[res], channels[res], downsample=False) for _ in range(n_blocks // 2)
        ]
        for _ in range(num_downsampling):
            modules.append(
                StyledConv(channels[res], channels[res * 2], 3, upsample=True, inject_noise=inject_noise)
            )
            res *= 2
        modules.append(ConvLayer(channels[res], output_nc, 1))
        self.convs = nn.Sequential(*modules)

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None, shared: bool = False
    ) -> torch.Tensor:
        for module in self.convs:
            x = module(x, generator, shared) if isinstance(module, StyledConv) else module(x)
        return x


class StyleGAN2Generator(nn.Module):
    """The SinCUT generator: ``encoder`` then ``decoder``, fully convolutional.

    Same interface as ``cut.networks.ResnetGenerator``: ``forward(x)`` returns the translation,
    ``forward(x, layers)`` also the outputs of the encoder modules ``encoder.convs[i]`` for i in
    ``layers`` (the official NCE layer indices), ``forward(x, layers, encode_only=True)`` only those
    features. ``generator`` feeds the decoder's noise (the global torch RNG when None, as officially).
    ``resolution`` sets the widths only (the official ``min(load_size, crop_size)`` rounded to a power
    of two); any input whose sides are multiples of ``2 ** num_downsampling`` is translated.

    ``noise_seed`` (None while training) makes inference deterministic: when set and no ``generator``
    is given, every forward draws the decoder's noise afresh on the CPU from this seed, one noise map
    shared by all images of the batch, so an image's output depends only on the image (and its size).
    ``cut.checkpoint.generator_from_checkpoint`` sets it to ``INFERENCE_NOISE_SEED``.
    """

    noise_seed: int | None = None

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 10,
        n_blocks: int = 6,
        num_downsampling: int = 1,
        resolution: int = 64,
        inject_noise: bool = True,
    ) -> None:
        super().__init__()
        if ngf < 1 or n_blocks < 0 or num_downsampling < 0:
            raise ValueError(
                f"ngf must be positive and n_blocks, num_downsampling >= 0; got {ngf}, "
                f"{n_blocks}, {num_downsampling}"
            )
        _checked_resolution(resolution, "generator")
        if resolution // 2**num_downsampling < RESOLUTIONS[0]:
            raise ValueError(
                f"generator: {num_downsampling} downsamplings take resolution {resolution} below 4"
            )
        self.input_nc = input_nc
        self.output_nc = output_nc
        self.ngf = ngf
        self.n_blocks = n_blocks
        self.num_downsampling = num_downsampling
        self.resolution = resolution
        self.inject_noise = inject_noise
        self.encoder = StyleGAN2Encoder(input_nc, ngf, n_blocks, num_downsampling, resolution)
        self.decoder = StyleGAN2Decoder(output_nc, ngf, n_blocks, num_downsampling, resolution, inject_noise)

    @property
    def architecture(self) -> dict[str, int | bool]:
        """Constructor arguments that rebuild this network."""
        return {
            "input_nc": self.input_nc,
            "output_nc": self.output_nc,
            "ngf": self.ngf,
            "n_blocks": self.n_blocks,
            "num_downsampling": self.num_downsampling,
            "resolution": self.resolution,
            "inject_noise": self.inject_noise,
        }

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this: one halving per downsampling."""
        return 2**self.num_downsampling

    @property
    def layer_count(self) -> int:
        """How many modules ``encoder.convs`` holds (the indices NCE layers may name)."""
        return len(self.encoder.convs)

    def feature_channels(self, layers: Sequence[int]) -> list[int]:
        """Channel count of the output of each encoder module index in ``layers``."""
        self._check_layers(layers)
        return [self.encoder.out_channels[i] for i in layers]

    def _check_layers(self, layers: Sequence[int]) -> None:
        bad = [i for i in layers if not 0 <= i < self.layer_count]
        if bad:
            raise ValueError(f"NCE layers {bad} are outside the encoder's modules 0..{self.layer_count - 1}")

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ValueError for a tensor this network cannot translate."""
        check_generator_input(x, self.input_nc, self.size_multiple, self.size_multiple)

    def forward(
        self,
        x: torch.Tensor,
        layers: Sequence[int] = (),
        encode_only: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        self.check_input(x)
        self._check_layers(layers)
        wanted = set(layers)
        last = max(layers) if layers else -1
        feats: dict[int, torch.Tensor] = {}
        for idx, module in enumerate(self.encoder.convs):
            x = module(x)
            if idx in wanted:
                feats[idx] = x
            if encode_only and idx == last:
                break
        ordered = [feats[i] for i in layers]
        if encode_only:
            return ordered
        shared = False
        if generator is None and self.noise_seed is not None and self.inject_noise:
            generator, shared = torch.Generator().manual_seed(self.noise_seed), True
        fake = self.decoder(x, generator, shared)
        return (fake, ordered) if layers else fake


class StyleGAN2Discriminator(nn.Module):
    """The SinCUT discriminator (``netD = stylegan2``): one logit per image.

    ``convs``: a 1x1 ConvLayer, then downsampling ResBlocks from ``size`` to 4x4; ``final_conv`` a
    3x3 ConvLayer; ``final_linear`` EqualLinear(C*16 -> C, leaky) and EqualLinear(C -> 1). The fully
    connected head fixes the input to ``size`` x ``size``.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 8, size: int = 64) -> None:
        super().__init__()
        if ndf < 1:
            raise ValueError(f"ndf must be positive, got {ndf}")
        self.input_nc = input_nc
        self.ndf = ndf
        self.size = _checked_resolution(size, "discriminator")
        channels = discriminator_channels(ndf)
        modules: list[nn.Module] = [ConvLayer(input_nc, channels[size], 1)]
        res = size
        while res > 4:
            modules.append(ResBlock(channels[res], channels[res // 2], downsample=True))
            res //= 2
        self.convs = nn.Sequential(*modules)
        self.final_conv = ConvLayer(channels[res], channels[4], 3)
        self.final_linear = nn.Sequential(
            EqualLinear(channels[4] * 4 * 4, channels[4], activation=True),
            EqualLinear(channels[4], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.input_nc or tuple(x.shape[-2:]) != (self.size, self.size):
            raise ValueError(
                f"discriminator expects (N, {self.input_nc}, {self.size}, {self.size}) images, "
                f"got shape {tuple(x.shape)}"
            )
        out = self.final_conv(self.convs(x))
        return self.final_linear(out.flatten(1))
