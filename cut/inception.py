"""The FID Inception network: Inception v3 as TensorFlow's FID code runs it, giving 2048-d pool3 features.

The layout (module names, shapes, BatchNorm eps 0.001, 1008 classes) is that of the weights file
``pt_inception-2015-12-05-6726825d.pth``, the PyTorch port of TensorFlow's ``inception-2015-12-05``
graph that pytorch-fid and torch-fidelity use. Where that graph differs from the ImageNet Inception v3,
so does this network: the average pools inside the mixed blocks leave the zero padding out of the mean,
and the last block pools its fourth branch with a max instead of an average. Weights come from the
caller (a state dict); finding or downloading the file is the jobs' business.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cut.checkpoint import CheckpointError, load_strict

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"
FEATURE_DIM = 2048
INPUT_SIZE = 299
NUM_CLASSES = 1008

Pool = Callable[[torch.Tensor], torch.Tensor]


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights file is not available; the message says which file to put where."""


def _avg_pool_valid(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool divides by the number of real (unpadded) inputs in the window.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def _max_pool_reduce(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2)


class ConvBN(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU: TensorFlow's ``conv2d`` unit."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class MixedA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1, 5x5, double 3x3 and pooled 1x1 branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_valid(x)),
        ], 1)


class ReductionB(nn.Module):
    """35x35 to 17x17 (Mixed_6a): strided 3x3, strided double 3x3 and a max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _max_pool_reduce(x),
        ], 1)


class MixedC(nn.Module):
    """17x17 block (Mixed_6b..6e): factorised 7x7 convolutions with ``c7`` inner channels."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool_valid(x)),
        ], 1)


class ReductionD(nn.Module):
    """17x17 to 8x8 (Mixed_7a): strided 3x3, 7x7-then-strided-3x3 and a max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), seven, _max_pool_reduce(x)], 1)


class MixedE(nn.Module):
    """8x8 block (Mixed_7b, 7c): split 1x3/3x1 branches; ``pool`` is the fourth branch's pooling."""

    def __init__(self, cin: int, pool: Pool) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(self.pool(x)),
        ], 1)


class FIDInception(nn.Module):
    """Images in [-1, 1] of any size to (N, 2048) pool3 features, as pytorch-fid computes them.

    Inputs are resized to 299x299 bilinearly (no antialiasing) on the [0, 1] scale, then mapped to
    [-1, 1]. ``fc`` (the 1008-way classifier) is unused for features; it is kept so that the weights
    file loads strictly, which proves it is the file this network was written for.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = MixedA(192, 32)
        self.Mixed_5c = MixedA(256, 64)
        self.Mixed_5d = MixedA(288, 64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, 128)
        self.Mixed_6c = MixedC(768, 160)
        self.Mixed_6d = MixedC(768, 160)
        self.Mixed_6e = MixedC(768, 192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, _avg_pool_valid)
        self.Mixed_7c = MixedE(2048, _max_pool_same)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)
        self.to(memory_format=torch.channels_last)  # ~4x faster convolutions on CPU (oneDNN) and GPU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
        unit = (x.float() + 1) / 2
        unit = F.interpolate(unit, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = (2 * unit - 1).contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_reduce(x)))
        x = _max_pool_reduce(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def fid_inception(state: Mapping[str, torch.Tensor], source: str = WEIGHTS_NAME) -> FIDInception:
    """The network with the weights of ``state`` (the weights file's state dict), in eval mode, frozen.

    Raises CheckpointError naming ``source`` when the state dict has another layout.
    """
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: expected a state dict, got {type(state).__name__}")
    net = FIDInception()
    # Files saved before BatchNorm counted its batches lack these buffers; they play no part in eval.
    counters = {k: v for k, v in net.state_dict().items() if k.endswith(".num_batches_tracked")}
    try:
        load_strict(net, {**counters, **state}, "FID Inception")
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: not the FID Inception weights ({WEIGHTS_NAME}): {exc}") from exc
    net.requires_grad_(False)
    return net.eval()
