"""The content score: does a translation keep the layout of light and dark of its input?

A translation may change colours and fine textures (a horse's coat becomes stripes) but not where
things are. The score compares the luminance of input and output at coarse scales, where textures
have averaged out and the layout remains: both images are resized to ANALYSIS_SIZE² and then to
each of SCALES (antialiased, triangle filter); at each scale, local means and (co)variances come
from a Gaussian window (sigma 1.5, 7 taps, no padding), the scale's score is

    sum over windows of 2 cov(x, y)  /  sum over windows of (var(x) + var(y))

and the score is the mean over scales, clipped to [0, 1]. This is SSIM's "contrast-structure"
term with its sums taken over the whole image before the division, so flat regions, which carry no
layout, carry no weight. Identical images score 1 (so does a colour change that keeps the
luminance layout), noise, a constant output or an unrelated scene about 0, an inverted image 0.
No learned weights: it runs on any machine. docs/quality.md gives the measurements behind it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ANALYSIS_SIZE = 64
SCALES = (32, 16)
WINDOW_SIGMA = 1.5
WINDOW_TAPS = 7
_EPS = 1e-8  # two flat images agree: (0 + eps) / (0 + eps) = 1

_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as Pillow's RGB -> L


def luminance(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luminance in [0, 1] of (N, C, H, W) images in [-1, 1] (C = 3, or 1 already grey)."""
    x = (images.float().clamp(-1, 1) + 1) / 2
    if x.shape[1] == 1:
        return x
    if x.shape[1] < 3:
        raise ValueError(f"luminance needs 1 or at least 3 channels, got {x.shape[1]}")
    weights = torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)
    return (x[:, :3] * weights).sum(1, keepdim=True)


def _window(like: torch.Tensor) -> torch.Tensor:
    taps = torch.arange(WINDOW_TAPS, device=like.device, dtype=like.dtype) - WINDOW_TAPS // 2
    g = torch.exp(-(taps**2) / (2 * WINDOW_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def _structure_agreement(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per image: sum of 2 cov / sum of (var x + var y) over Gaussian windows, in [-1, 1]."""
    w = _window(x)
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    var_x = F.conv2d(x * x, w) - mx * mx
    var_y = F.conv2d(y * y, w) - my * my
    cov = F.conv2d(x * y, w) - mx * my
    num = 2 * cov.sum(dim=(1, 2, 3))
    den = (var_x + var_y).clamp(min=0).sum(dim=(1, 2, 3))
    return (num + _EPS) / (den + _EPS)


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize: its triangle filter removes textures of a period up to twice the
    reduction factor (period-8 stripes vanish at a quarter of the size) instead of aliasing them."""
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


@torch.inference_mode()
def content_score(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """(N,) scores in [0, 1] for pairs of (N, C, H, W) images in [-1, 1] (sizes may differ)."""
    if inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {outputs.shape[0]} outputs")
    x, y = (_resized(luminance(images).double(), ANALYSIS_SIZE) for images in (inputs, outputs))
    per_scale = [_structure_agreement(_resized(x, s), _resized(y, s)) for s in SCALES]
    return torch.stack(per_scale).mean(0).clamp(0, 1).float()
