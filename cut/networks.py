"""CUT networks: ResNet generator, PatchGAN discriminator, PatchSampleF heads, blur resampling.

Module indices, parameter names and buffer names follow the official implementation, so its
checkpoints load with ``strict=True`` (docs/official-reference.md §4-§7 and §14). The layers are
the official ones, written plainly; ``cut.fast.accelerate`` swaps in faster forms of the same
function (the models and the checkpoint loader apply it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cut.losses import at_least_fp32

NCE_LAYERS: tuple[int, ...] = (0, 4, 8, 12, 16)


def check_generator_input(x: torch.Tensor, input_nc: int, multiple: int, minimum: int,
                          who: str = "generator") -> None:
    """A clear ValueError for a tensor a generator cannot translate: it takes (N, input_nc, H, W)
    with H and W multiples of ``multiple`` and at least ``minimum``."""
    if x.dim() != 4 or x.shape[1] != input_nc:
        raise ValueError(f"{who} expects a (N, {input_nc}, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple or h < minimum or w < minimum:
        raise ValueError(f"{who} needs height and width that are multiples of {multiple} and at least "
                         f"{minimum}, got {h}x{w}")


def _binomial_filter(taps: Sequence[float], channels: int, scale: float) -> torch.Tensor:
    """A (channels, 1, k, k) depthwise filter: the outer product of ``taps``, summing to ``scale``."""
    # Computed on the CPU, then moved to the default device: on the meta device (checkpoint checks
    # build networks there) this arithmetic would import torch._dynamo, seconds of every job's start.
    a = torch.tensor(taps, dtype=torch.float32, device="cpu")
    kernel = a[:, None] * a[None, :]
    kernel = kernel / kernel.sum() * scale
    return kernel[None, None].repeat(channels, 1, 1, 1).to(torch.get_default_device())


class Downsample(nn.Module):
    """Anti-aliased stride-2 downsampling: reflect pad 1, then a [1,2,1] x [1,2,1] / 16 binomial
    blur with stride 2, as a depthwise convolution (``filt``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", _binomial_filter((1.0, 2.0, 1.0), channels, 1.0))

    def check_input(self, x: torch.Tensor) -> None:
        if min(x.shape[-2:]) < 2:
            raise ValueError(f"blur downsampling needs at least 2x2 inputs, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        return F.conv2d(padded, self.filt.to(x.dtype), stride=2, groups=x.shape[1])


class Upsample(nn.Module):
    """Anti-aliased 2x upsampling: replicate pad 1, a depthwise transposed convolution with the
    [1,3,3,1] x [1,3,3,1] / 16 blur times 4 (``filt``), stride 2 and padding 2, then one row and
    column cropped on each side."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("filt", _binomial_filter((1.0, 3.0, 3.0, 1.0), channels, 4.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        y = F.conv_transpose2d(padded, self.filt.to(x.dtype), stride=2, padding=2, groups=x.shape[1])
        return y[:, :, 1:-1, 1:-1]


NORM_TYPES = ("instance", "batch", "none")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """The official ``get_norm_layer`` choice: instance (no affine, no running stats), batch
    (affine, running stats) or none (an identity, no state)."""
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {', '.join(NORM_TYPES)}, got {norm!r}")


def uses_bias(norm: str) -> bool:
    """Whether the convolutions in front of a norm carry a bias: officially only with instance norm
    (``use_bias = norm_layer.func == nn.InstanceNorm2d``), so neither with batch norm nor with none."""
    if norm not in NORM_TYPES:
        raise ValueError(f"norm must be one of {', '.join(NORM_TYPES)}, got {norm!r}")
    return norm == "instance"


def _stride1_conv(c_in: int, c_out: int, bias: bool, kernel_size: int = 3, padding: int = 0) -> nn.Conv2d:
    """``nn.Conv2d(c_in, c_out, kernel_size, padding=padding, bias=bias)``, built with a bias that
    is then dropped where ``bias`` is false: construction draws the bias's random numbers either
    way, so a seeded model starts from the weights it always has (``init_weights`` draws next)."""
    conv = nn.Conv2d(c_in, c_out, kernel_size=kernel_size, padding=padding, bias=True)
    if not bias:
        conv.register_parameter("bias", None)
    return conv


class ResnetBlock(nn.Module):
    """x + [pad, conv3x3, norm, ReLU, (Dropout(0.5),) pad, conv3x3, norm](x), no activation after the
    sum. The dropout, where used, sits at index 4 and moves the second convolution to index 6."""

    def __init__(self, dim: int, norm: str = "instance", use_dropout: bool = False) -> None:
        super().__init__()
        bias = uses_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(1), _stride1_conv(dim, dim, bias), norm_layer(norm, dim), nn.ReLU(True)
        ]
        if use_dropout:
            layers.append(nn.Dropout(0.5))
        layers += [nn.ReflectionPad2d(1), _stride1_conv(dim, dim, bias), norm_layer(norm, dim)]
        self.conv_block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


def generator_layer_count(n_blocks: int, antialias: bool = True, antialias_up: bool = True) -> int:
    """How many modules ``ResnetGenerator.model`` holds (the indices ``nce_layers`` may name)."""
    return 4 + 2 * (4 if antialias else 3) + n_blocks + 2 * (4 if antialias_up else 3) + 3


class ResnetGenerator(nn.Module):
    """The CUT ResNet generator (resnet_9blocks / resnet_6blocks) as one ``nn.Sequential`` ``model``.

    ``forward(x)`` returns the translated image; ``forward(x, layers)`` also returns the outputs of
    the modules at ``layers`` from the same pass; ``forward(x, layers, encode_only=True)`` stops after
    the last requested module and returns only the features.

    ``norm`` is the official normG (instance, batch or none; convolutions in front of a norm carry
    a bias only with instance norm); ``use_dropout`` adds Dropout(0.5) to every ResNet block.
    """

    size_multiple = 4  # height and width must be multiples of this

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        ngf: int = 64,
        n_blocks: int = 9,
        antialias: bool = True,
        antialias_up: bool = True,
        norm: str = "instance",
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.input_nc = input_nc
        self.output_nc = output_nc
        self.ngf = ngf
        self.n_blocks = n_blocks
        self.antialias = antialias
        self.antialias_up = antialias_up
        self.norm = norm
        self.use_dropout = use_dropout
        bias = uses_bias(norm)
        layers: list[nn.Module] = [
            nn.ReflectionPad2d(3),
            nn.Conv2d(input_nc, ngf, kernel_size=7, padding=0, bias=bias),
            norm_layer(norm, ngf),
            nn.ReLU(True),
        ]
        for i in range(2):  # two downsampling stages
            c_in, c_out = ngf * 2**i, ngf * 2 ** (i + 1)
            if antialias:
                layers += [
                    _stride1_conv(c_in, c_out, bias, padding=1),
                    norm_layer(norm, c_out),
                    nn.ReLU(True),
                    Downsample(c_out),
                ]
            else:
                layers += [
                    nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=bias),
                    norm_layer(norm, c_out),
                    nn.ReLU(True),
                ]
        layers += [ResnetBlock(ngf * 4, norm, use_dropout) for _ in range(n_blocks)]
        for i in range(2):  # two upsampling stages
            c_in, c_out = ngf * 2 ** (2 - i), ngf * 2 ** (1 - i)
            if antialias_up:
                layers += [
                    Upsample(c_in),
                    _stride1_conv(c_in, c_out, bias, padding=1),
                    norm_layer(norm, c_out),
                    nn.ReLU(True),
                ]
            else:
                layers += [
                    nn.ConvTranspose2d(
                        c_in, c_out, kernel_size=3, stride=2, padding=1, output_padding=1, bias=bias
                    ),
                    norm_layer(norm, c_out),
                    nn.ReLU(True),
                ]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, output_nc, kernel_size=7, padding=0), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    @property
    def architecture(self) -> dict[str, int | bool]:
        """Constructor arguments that rebuild this network (stored in exports)."""
        return {
            "input_nc": self.input_nc,
            "output_nc": self.output_nc,
            "ngf": self.ngf,
            "n_blocks": self.n_blocks,
            "antialias": self.antialias,
            "antialias_up": self.antialias_up,
            "norm": self.norm,
            "use_dropout": self.use_dropout,
        }

    def feature_channels(self, layers: Sequence[int]) -> list[int]:
        """Channel count of the output of each module index in ``layers``."""
        channels, out = self.input_nc, {}
        for idx, module in enumerate(self.model):
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                channels = module.out_channels
            out[idx] = channels
        return [out[i] for i in layers]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ValueError for a tensor this network cannot translate."""
        check_generator_input(x, self.input_nc, self.size_multiple, 8)

    def forward(
        self, x: torch.Tensor, layers: Sequence[int] = (), encode_only: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]] | list[torch.Tensor]:
        self.check_input(x)
        if not layers:
            return self.model(x)
        wanted = set(layers)
        last = max(layers)
        modules = list(self.model)
        feats: dict[int, torch.Tensor] = {}
        for idx, module in enumerate(modules):
            x = module(x)
            if encode_only and idx == last:
                feats[idx] = x
                break
            if idx in wanted:
                # An in-place activation next would overwrite the feature (e.g. layer 16 of a
                # 2-block generator is an InstanceNorm output): keep a copy. The last layer must
                # hold what encode_only returns, so there look past identity norms (norm none) too;
                # earlier layers behind one alias as in the official code, where the ReLU after an
                # identity norm overwrites the stored convolution output (layers 4 and 8).
                after = idx + 1
                while idx == last and after < len(modules) and isinstance(modules[after], nn.Identity):
                    after += 1
                next_inplace = after < len(modules) and getattr(modules[after], "inplace", False)
                feats[idx] = x.clone() if next_inplace else x
        ordered = [feats[i] for i in layers]
        return ordered if encode_only else (x, ordered)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator ('basic' is n_layers=3); no sigmoid, kernel 4, padding 1. The input
    and output convolutions have a bias whatever the norm; the hidden ones only with instance norm.
    """

    def __init__(
        self,
        input_nc: int = 3,
        ndf: int = 64,
        n_layers: int = 3,
        antialias: bool = True,
        norm: str = "instance",
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}")
        bias = uses_bias(norm)
        kw, padw = 4, 1
        if antialias:
            seq: list[nn.Module] = [
                nn.Conv2d(input_nc, ndf, kw, stride=1, padding=padw),
                nn.LeakyReLU(0.2, True),
                Downsample(ndf),
            ]
        else:
            seq = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            if antialias:
                seq += [
                    _stride1_conv(ndf * prev, ndf * mult, bias, kw, padding=padw),
                    norm_layer(norm, ndf * mult),
                    nn.LeakyReLU(0.2, True),
                    Downsample(ndf * mult),
                ]
            else:
                seq += [
                    nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=bias),
                    norm_layer(norm, ndf * mult),
                    nn.LeakyReLU(0.2, True),
                ]
        prev, mult = mult, min(2**n_layers, 8)
        seq += [
            _stride1_conv(ndf * prev, ndf * mult, bias, kw, padding=padw),
            norm_layer(norm, ndf * mult),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw),
        ]
        self.model = nn.Sequential(*seq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PixelDiscriminator(nn.Module):
    """The official 1x1 PixelGAN ('pixel'): judges every pixel on its own, as ``net``:
    conv1x1(ndf), LeakyReLU, conv1x1(2 ndf), norm, LeakyReLU, conv1x1(1). Its first convolution
    always has a bias; the other two only with instance norm (the official ``use_bias``)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, norm: str = "instance") -> None:
        super().__init__()
        bias = uses_bias(norm)
        self.net = nn.Sequential(
            nn.Conv2d(input_nc, ndf, kernel_size=1),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf, ndf * 2, kernel_size=1, bias=bias),
            norm_layer(norm, ndf * 2),
            nn.LeakyReLU(0.2, True),
            nn.Conv2d(ndf * 2, 1, kernel_size=1, bias=bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


DISCRIMINATORS = ("basic", "n_layers", "pixel")


def define_discriminator(
    netD: str, input_nc: int = 3, ndf: int = 64, n_layers_D: int = 3, norm: str = "instance",
    antialias: bool = True,
) -> nn.Module:
    """The official ``define_D`` choices: basic (the 3-layer PatchGAN, ``n_layers_D`` unused),
    n_layers (a PatchGAN of ``n_layers_D`` layers) or pixel (``PixelDiscriminator``)."""
    if netD == "basic":
        return NLayerDiscriminator(input_nc, ndf, 3, antialias, norm)
    if netD == "n_layers":
        return NLayerDiscriminator(input_nc, ndf, n_layers_D, antialias, norm)
    if netD == "pixel":
        return PixelDiscriminator(input_nc, ndf, norm)
    raise ValueError(f"netD must be one of {', '.join(DISCRIMINATORS)}, got {netD!r}")


def l2_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row divided by (its L2 norm + 1e-7), the norm taken in at least fp32: the official
    Normalize, value for value. The norm's own gradient at an all-zero row (0 x inf = NaN through
    the square root) is its limit, 0, so such a row gets the finite derivative of the normalised
    row there (the identity over 1e-7); every other row's gradient is autograd's as before."""
    squares = at_least_fp32(x).pow(2).sum(1, keepdim=True)
    nonzero = squares > 0
    # sqrt runs on 1 in place of 0, so its backward stays finite; where() then routes no gradient there
    norm = torch.where(nonzero, torch.where(nonzero, squares, 1.0).sqrt(), 0.0)
    return x / (norm.to(x.dtype) + 1e-7)


class PatchSampleF(nn.Module):
    """One two-layer MLP head per NCE layer (``mlp_0`` ...), applied to sampled patch features.

    Unlike the official module the heads are built at construction from the known input channels,
    so optimizers and DDP see them from the start. ``use_mlp=False`` is ``netF = sample``: no heads,
    the sampled features are only normalised (docs/official-reference.md §18).
    """

    def __init__(self, in_channels: Sequence[int], nc: int = 256, use_mlp: bool = True) -> None:
        super().__init__()
        self.nc = nc
        self.use_mlp = use_mlp
        self.num_heads = len(in_channels) if use_mlp else 0
        for i, c in enumerate(in_channels if use_mlp else ()):
            self.add_module(f"mlp_{i}", nn.Sequential(nn.Linear(c, nc), nn.ReLU(), nn.Linear(nc, nc)))

    def forward(self, feats: Sequence[torch.Tensor], patch_ids: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Project the patches at ``patch_ids`` of each feature map; returns L2-normalised (N*P, nc).

        A layer's ids are either (P,), shared by every image, or (N, P), one row per image. Rows of
        the result are batch-major, as in the official code.
        """
        out = []
        for i, (feat, ids) in enumerate(zip(feats, patch_ids, strict=True)):
            n, c = feat.shape[:2]
            flat = feat.flatten(2)  # N x C x HW, positions row-major as in the official reshape
            if ids.dim() == 1:
                picked = flat[:, :, ids]
            else:
                picked = torch.gather(flat, 2, ids[:, None, :].expand(n, c, ids.shape[1]))
            x = picked.transpose(1, 2).reshape(-1, c)
            if self.use_mlp:
                x = getattr(self, f"mlp_{i}")(x)
            out.append(l2_rows(x))
        return out


def sample_patch_ids(
    feats: Sequence[torch.Tensor], num_patches: int, generator: torch.Generator
) -> list[torch.Tensor]:
    """Draw ``min(num_patches, H*W)`` distinct positions per feature map, shared by the batch."""
    ids = []
    for feat in feats:
        hw = feat.shape[2] * feat.shape[3]
        perm = torch.randperm(hw, generator=generator)[: min(num_patches, hw)]
        ids.append(perm.to(feat.device))
    return ids


INIT_TYPES = ("normal", "xavier", "kaiming", "orthogonal")


def init_weights(net: nn.Module, gain: float = 0.02, init_type: str = "xavier") -> nn.Module:
    """The official init (docs/official-reference.md §11): every Conv*/Linear weight from ``init_type``
    (normal: N(0, gain); xavier: Xavier-normal with ``gain``; kaiming: Kaiming-normal, a=0, fan_in,
    ``gain`` unused; orthogonal: with ``gain``), its bias zero; BatchNorm2d weights N(1, gain), bias
    zero. Buffers (the blur filters) are untouched."""
    if init_type not in INIT_TYPES:
        raise ValueError(f"init_type must be one of {', '.join(INIT_TYPES)}, got {init_type!r}")
    for m in net.modules():
        name = type(m).__name__
        if ("Conv" in name or "Linear" in name) and getattr(m, "weight", None) is not None:
            if init_type == "normal":
                nn.init.normal_(m.weight, 0.0, gain)
            elif init_type == "xavier":
                nn.init.xavier_normal_(m.weight, gain=gain)
            elif init_type == "kaiming":
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
            else:
                nn.init.orthogonal_(m.weight, gain=gain)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif "BatchNorm2d" in name and getattr(m, "weight", None) is not None:
            nn.init.normal_(m.weight, 1.0, gain)
            nn.init.zeros_(m.bias)
    return net
