"""The official U-Net generators (unet_128, unet_256), built so their checkpoints load strictly.

Module names and indices follow the official ``UnetGenerator`` / ``UnetSkipConnectionBlock``
(docs/official-reference.md, "Network options"): the generator's ``model`` is the outermost block,
every block keeps its layers in ``model`` and its inner block at index 1 (outermost) or 3 (others).

The official CUT cannot train these: its U-Net takes only the image, while PatchNCE asks the
generator for intermediate features (``netG(x, nce_layers, encode_only=True)``), which fails with a
TypeError. Here they translate (and export); ``forward`` with feature layers is a clear error, and
the model config refuses them for training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from cut.networks import check_generator_input, norm_layer, uses_bias

UNET_DOWNS = {"unet_128": 7, "unet_256": 8}  # netG name -> downsamplings (128 or 256 px to 1x1)


class UnetSkipBlock(nn.Module):
    """One level of the U-Net: down (LeakyReLU, stride-2 conv 4x4, norm), the inner block, up (ReLU,
    transposed conv 4x4, norm), and the block's input concatenated in front of its output.

    The outermost level has no activation or norm on the way down, no skip, and ends in a Tanh;
    the innermost has no inner block and no norm on the way down. ``use_dropout`` appends
    Dropout(0.5) to a middle level (after every parameter, so the state dict is unchanged).
    """

    def __init__(
        self,
        outer_nc: int,
        inner_nc: int,
        input_nc: int | None = None,
        inner: nn.Module | None = None,
        outermost: bool = False,
        norm: str = "instance",
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        bias = uses_bias(norm)
        k4s2 = {"kernel_size": 4, "stride": 2, "padding": 1}
        down_conv = nn.Conv2d(input_nc or outer_nc, inner_nc, bias=bias, **k4s2)
        if outermost:
            assert inner is not None
            up_conv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, **k4s2)  # always with a bias
            layers = [down_conv, inner, nn.ReLU(True), up_conv, nn.Tanh()]
        elif inner is None:  # innermost
            up_conv = nn.ConvTranspose2d(inner_nc, outer_nc, bias=bias, **k4s2)
            layers = [nn.LeakyReLU(0.2, True), down_conv, nn.ReLU(True), up_conv, norm_layer(norm, outer_nc)]
        else:
            up_conv = nn.ConvTranspose2d(inner_nc * 2, outer_nc, bias=bias, **k4s2)
            layers = [nn.LeakyReLU(0.2, True), down_conv, norm_layer(norm, inner_nc), inner,
                      nn.ReLU(True), up_conv, norm_layer(norm, outer_nc)]
            if use_dropout:
                layers.append(nn.Dropout(0.5))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # The official block's first layer is an in-place LeakyReLU on its input, which then goes
        # into the concatenation: the skip carries LeakyReLU(x), not x. Made explicit here, so that
        # tracers and exporters record the same computation.
        first, *rest = self.model
        x = first(x)
        y = x
        for layer in rest:
            y = layer(y)
        return torch.cat([x, y], 1)


class UnetGenerator(nn.Module):
    """The official U-Net generator: ``num_downs`` stride-2 levels (7: unet_128, 8: unet_256), widths
    ngf, 2 ngf, 4 ngf, then 8 ngf for the rest; ``use_dropout`` puts Dropout(0.5) in the
    ``num_downs - 5`` middle levels of width 8 ngf. Height and width must be multiples of
    2**num_downs."""

    def __init__(
        self,
        input_nc: int = 3,
        output_nc: int = 3,
        num_downs: int = 8,
        ngf: int = 64,
        norm: str = "instance",
        use_dropout: bool = False,
    ) -> None:
        super().__init__()
        if num_downs < 5:
            raise ValueError(f"a U-Net generator needs num_downs >= 5, got {num_downs}")
        self.input_nc, self.output_nc, self.num_downs, self.ngf = input_nc, output_nc, num_downs, ngf
        self.norm, self.use_dropout = norm, use_dropout
        block = UnetSkipBlock(ngf * 8, ngf * 8, norm=norm)
        for _ in range(num_downs - 5):
            block = UnetSkipBlock(ngf * 8, ngf * 8, inner=block, norm=norm, use_dropout=use_dropout)
        for mult in (4, 2, 1):
            block = UnetSkipBlock(ngf * mult, ngf * mult * 2, inner=block, norm=norm)
        self.model = UnetSkipBlock(output_nc, ngf, input_nc, inner=block, outermost=True, norm=norm)

    @property
    def size_multiple(self) -> int:
        """Height and width must be multiples of this (each level halves them)."""
        return 2**self.num_downs

    @property
    def architecture(self) -> dict[str, int | bool | str]:
        """Constructor arguments that rebuild this network (stored in exports)."""
        return {
            "input_nc": self.input_nc,
            "output_nc": self.output_nc,
            "num_downs": self.num_downs,
            "ngf": self.ngf,
            "norm": self.norm,
            "use_dropout": self.use_dropout,
        }

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a clear ValueError for a tensor this network cannot translate."""
        m = self.size_multiple
        check_generator_input(x, self.input_nc, m, m, f"a U-Net generator with {self.num_downs} levels")

    def forward(self, x: torch.Tensor, layers: Sequence[int] = (), encode_only: bool = False) -> torch.Tensor:
        if layers or encode_only:
            raise ValueError(
                "a U-Net generator has no PatchNCE feature layers (the official UnetGenerator takes only "
                "the image, so the official CUT cannot train it): use a resnet generator for training"
            )
        self.check_input(x)
        return self.model(x)


def infer_unet_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, int | bool | str]:
    """UnetGenerator arguments from an official-layout U-Net state dict (``use_dropout`` cannot be
    seen in the weights: dropout has none and sits after them; it is reported as False)."""
    if "model.model.0.weight" not in state:
        raise ValueError("not a U-Net generator state dict: no key 'model.model.0.weight'")
    first = state["model.model.0.weight"]  # (ngf, input_nc, 4, 4)
    last = state.get("model.model.3.weight")  # (2 ngf, output_nc, 4, 4), transposed
    if last is None:
        raise ValueError("not a U-Net generator state dict: no key 'model.model.3.weight'")
    # each level nests one ".model." deeper: model.model.1.model.3.model...
    depth = max(key.count("model.") for key in state) - 1
    if any(key.endswith("running_mean") for key in state):
        norm = "batch"
    else:
        norm = "instance" if "model.model.0.bias" in state else "none"
    return {
        "input_nc": int(first.shape[1]),
        "output_nc": int(last.shape[1]),
        "num_downs": depth,
        "ngf": int(first.shape[0]),
        "norm": norm,
        "use_dropout": False,
    }
