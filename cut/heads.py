"""The PatchNCE heads ``model.netF`` names (docs/official-reference.md §18).

- ``mlp_sample`` (the official default): sampled patch features through a two-layer MLP per layer;
- ``sample``: the sampled patch features themselves, L2-normalised; no parameters;
- ``reshape``: each layer average-pooled to 4 x 4, the 16 cells taken as its patches (the patch ids
  are ignored), L2-normalised; no parameters.

Every head takes ``(feats, patch_ids)`` and returns one (N*P, C) matrix per layer, rows batch-major,
which is what ``cut.losses.patch_nce_loss`` expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cut.networks import PatchSampleF, l2_rows

HEADS = ("mlp_sample", "sample", "reshape")
RESHAPE_GRID = 4  # the official ReshapeF pools every feature map to 4 x 4


class ReshapeF(nn.Module):
    """``netF = reshape``: the 4 x 4 average-pooled cells of each layer as its patches; no parameters."""

    def forward(
        self, feats: Sequence[torch.Tensor], patch_ids: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """(N*16, C) per layer: cells in row-major order within each image, images in batch order."""
        del patch_ids  # the grid fixes the patches: query and key cells match by position
        cells = [F.adaptive_avg_pool2d(f, RESHAPE_GRID).permute(0, 2, 3, 1).flatten(0, 2) for f in feats]
        return [l2_rows(c) for c in cells]


def define_head(net_f: str, in_channels: Sequence[int], nc: int = 256) -> nn.Module:
    """The head ``model.netF`` names, for features of ``in_channels`` (one entry per NCE layer)."""
    if net_f == "mlp_sample":
        return PatchSampleF(in_channels, nc)
    if net_f == "sample":
        return PatchSampleF(in_channels, nc, use_mlp=False)
    if net_f == "reshape":
        return ReshapeF()
    raise ValueError(f"model.netF must be one of {', '.join(HEADS)}, got {net_f!r}")
