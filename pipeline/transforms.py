"""Geometry: decoded pixels (``pipeline.pixels``) resized, cropped and flipped as the official CUT
train and test preprocessing does, then scaled to the network's range.

Tensors are float32 (C, H, W) in [-1, 1], as torchvision's ToTensor + Normalize(0.5, 0.5) give.
Every size is decided before any pixel is resized (`train_resize`, `inference_geometry`), so callers
check it once and pass it on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.pixels import DEFAULT_MAX_PIXELS, ImageDecodeError

INFERENCE_MODES = ("official", "none", "shortside")


def chw_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """(C, H, W) uint8/uint16 copy of an image or (H, W, C) array, channels-last in memory (torch's
    fastest resize layout)."""
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def to_tensor(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (or uint16) (..., C, H, W) to float32 in [-1, 1], with the arithmetic of ToTensor +
    Normalize(0.5, 0.5): v / 255 (v / 65535) * 2 - 1."""
    scale = 65535.0 if pixels.dtype == torch.uint16 else 255.0
    return pixels.float().div_(scale).sub_(0.5).div_(0.5)


def resize_uint8(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of a uint8 (or uint16) (C, H, W) tensor with Pillow's filter (a = -0.5,
    antialiased).

    Torch's uint8 kernel is about twice as fast as Pillow's and agrees with it within 2 levels;
    16-bit pixels are resized in float32 and rounded.
    """
    if chw.shape[1:] == (height, width):
        return chw
    wide = chw.dtype == torch.uint16
    x = chw.unsqueeze(0).float() if wide else chw.unsqueeze(0)
    out = F.interpolate(x, size=(height, width), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 65535).to(torch.uint16) if wide else out


def resize_pixels(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of (H, W) or (H, W, C) uint8/uint16 pixels to ``size`` (w, h), each channel
    alone, with Pillow's filter (8-bit RGB and L in one call: Pillow's image resize exactly)."""
    if (array.shape[1], array.shape[0]) == tuple(size):
        return array
    bicubic = Image.Resampling.BICUBIC
    if array.ndim == 3 and array.shape[2] == 1:
        return resize_pixels(array[:, :, 0], size)[:, :, None]
    if array.ndim == 2 or (array.dtype == np.uint8 and array.shape[2] == 3):
        return np.asarray(Image.fromarray(array).resize(size, bicubic)).astype(array.dtype, copy=False)
    return np.stack([resize_pixels(array[:, :, c], size) for c in range(array.shape[2])], axis=2)


TRAIN_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "scale_shortside",
               "scale_shortside_and_crop", "none")


def train_resize(size: tuple[int, int], mode: str, load_size: int, crop_size: int) -> tuple[int, int]:
    """The (w, h) an image of ``size`` is resized to before the crop, as the official ``get_transform``
    decides by the words in ``preprocess``: ``resize`` to load_size square (aspect ignored);
    ``scale_width`` to width load_size, height ``int(max(load_size * h / w, crop_size))``;
    ``scale_shortside`` up to a short side of load_size (never down); else unchanged."""
    width, height = size
    if "resize" in mode:
        return load_size, load_size
    if "scale_width" in mode:
        if width == load_size and height >= crop_size:
            return size
        return load_size, int(max(load_size * height / width, crop_size))
    if "scale_shortside" in mode and min(size) < load_size:
        scale = load_size / min(size)
        return round(width * scale), round(height * scale)
    return size


def check_train_size(size: tuple[int, int], mode: str, load_size: int, crop_size: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """The `train_resize` of an image of ``size`` (w, h), for `train_crop`; ImageDecodeError for one
    that `train_crop` cannot make a training input of: `too-large` where its resize in ``mode``
    exceeds ``max_pixels`` (scale_shortside of a thin image, scale_width of a tall one), `too-small`
    where a side ends below ``crop_size``: the crop modes' RandomCrop would fail, and `none` keeps
    sizes the networks, sized for the crop, may not take (every other mode reaches crop_size by
    construction)."""
    resized = width, height = train_resize(size, mode, load_size, crop_size)
    if width * height > max_pixels:
        raise ImageDecodeError("too-large", f"{size[0]}x{size[1]} becomes {width}x{height} under "
                                            f"data.preprocess {mode}: more than {max_pixels} pixels")
    if mode == "none":
        width, height = multiple_of((width, height))
    if min(width, height) < crop_size:
        raise ImageDecodeError("too-small", f"{width}x{height} after data.preprocess {mode}: smaller "
                                            f"than the {crop_size} crop (data.crop_size)")
    return resized


def train_crop(img: Image.Image | np.ndarray, rng: np.random.Generator, load_size: int, crop_size: int,
               flip: bool = True, decay: bool = False, mode: str = "resize_and_crop",
               resized: tuple[int, int] | None = None) -> torch.Tensor:
    """The official training transform of ``data.preprocess`` ``mode`` before the scaling to float
    (`to_tensor`): a uint8 (uint16 for 16-bit pixels) (C, H, W) tensor, (C, crop, crop) in the
    `_and_crop` modes and `crop`. Batches convert to float once for the whole stack, which is cheaper
    than per image.

    `resize_and_crop`: bicubic resize to load_size x load_size (aspect ignored), random crop_size
    crop; other modes: `train_resize`, then a random crop where the mode says `crop`; every mode then
    resizes to sides that are multiples of 4, flips at random. In the LR-decay phase (`decay`) the
    official dataset sets load_size to crop_size: for resize_and_crop a plain resize with no crop
    jitter; the flip stays. ``resized``: the image's `train_resize` where the caller has it already
    (`check_train_size`).
    """
    if crop_size % 4:
        raise ValueError(f"crop_size must be a multiple of 4, got {crop_size}")
    size = crop_size if decay else load_size
    if size < crop_size:
        raise ValueError(f"load_size {load_size} is smaller than crop_size {crop_size}")
    chw = chw_tensor(img)
    width, height = resized or train_resize((chw.shape[2], chw.shape[1]), mode, size, crop_size)
    chw = resize_uint8(chw, height, width)
    if "crop" in mode:
        if height < crop_size or width < crop_size:
            raise ValueError(f"a {width}x{height} image is smaller than the {crop_size} crop")
        top, left = rng.integers(0, [height - crop_size + 1, width - crop_size + 1])
        chw = chw[:, top:top + crop_size, left:left + crop_size]
    width, height = multiple_of((chw.shape[2], chw.shape[1]))
    chw = resize_uint8(chw, height, width)
    if flip and rng.random() < 0.5:
        chw = flip_width(chw)
    return chw


def flip_width(chw: torch.Tensor) -> torch.Tensor:
    """Mirror left-right; torch has no flip kernel for uint16 (16-bit pixels), so those flip the same
    bits read as int16."""
    if chw.dtype == torch.uint16:
        return chw.view(torch.int16).flip(-1).view(torch.uint16)
    return chw.flip(-1)


def multiple_of(size: tuple[int, int], base: int = 4) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of `base` (the official `__make_power_2`)."""
    return max(base, round(size[0] / base) * base), max(base, round(size[1] / base) * base)


@dataclass(frozen=True)
class NetworkGeometry:
    """Where test-time preprocessing puts an image: resized to ``target`` (w, h) as the mode says, then
    to ``resized`` (each side the nearest multiple of the network's, as the official code does), then
    mirrored out to ``network`` on sides the network cannot take that short; ``box`` (left, top,
    right, bottom) is the image within the network input, the part of the output to keep."""

    target: tuple[int, int]
    resized: tuple[int, int]
    network: tuple[int, int]

    @property
    def box(self) -> tuple[int, int, int, int]:
        left, top = ((n - r) // 2 for n, r in zip(self.network, self.resized, strict=True))
        return left, top, left + self.resized[0], top + self.resized[1]

    @property
    def pixels(self) -> int:
        """The most pixels any stage holds: the mode's resize, or the network input."""
        return max(self.target[0] * self.target[1], self.network[0] * self.network[1])


def inference_geometry(size: tuple[int, int], mode: str, load_size: int, crop_size: int,
                       multiple: int = 4, minimum: int = 8) -> NetworkGeometry:
    """The sizes `inference_pixels` gives an image of ``size`` (w, h) (see there). Nothing is allocated:
    callers check the sizes before the pixels exist."""
    width, height = size
    if mode == "official":
        target = (crop_size, crop_size)
    elif mode == "shortside":
        scale = load_size / min(width, height)
        target = (round(width * scale), round(height * scale))
    elif mode == "none":
        target = (width, height)
    else:
        raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {INFERENCE_MODES}")
    rounded = multiple_of(target, multiple)
    # A side that rounds below the network's minimum (a 5 px icon: 4, where a ResNet takes 8) keeps its
    # pixels at their own scale and is mirrored out instead: stretching it would change what the
    # network sees far more than the rounding changes any larger image.
    floor = -(-minimum // multiple) * multiple
    resized = tuple(t if r < floor else r for t, r in zip(target, rounded, strict=True))
    network = tuple(max(r, floor) for r in resized)
    return NetworkGeometry(target, resized, network)  # type: ignore[arg-type]


def inference_pixels(img: Image.Image | np.ndarray, mode: str, load_size: int, crop_size: int,
                     multiple: int = 4, minimum: int = 8) -> torch.Tensor:
    """Test-time preprocessing with Pillow's resize, as (C, H, W) uint8 (uint16 for 16-bit pixels):
    bit-exact with the official test inputs when the image was decoded at full size; `to_tensor`
    scales them. Takes an image or (H, W, C) pixels (`pipeline.pixels.Pixels.array`).

    `official`: resize to crop_size x crop_size, as test.py does (its load_size defaults to the crop).
    `none`: keep the size, rounded to a multiple of `multiple` (4, as the official code does; a
    U-Net needs 128 or 256) for the network.
    `shortside`: resize so the shortest side is load_size, keeping the aspect ratio (the official
    `scale_shortside` only ever enlarges; this also shrinks large inputs).
    A side that would round below `minimum` (what the network takes: 8 for a ResNet generator) is
    mirrored out to it instead (`NetworkGeometry.box` locates the image in the result).
    """
    array = np.asarray(img)
    geometry = inference_geometry((array.shape[1], array.shape[0]), mode, load_size, crop_size, multiple,
                                  minimum)
    return geometry_pixels(array, geometry)


def geometry_pixels(array: np.ndarray, geometry: NetworkGeometry) -> torch.Tensor:
    """(H, W, C) pixels placed as ``geometry`` says (see `inference_pixels`), as (C, H, W)."""
    array = resize_pixels(resize_pixels(array, geometry.target), geometry.resized)
    if geometry.resized != geometry.network:
        left, top, right, bottom = geometry.box
        pad = [(top, geometry.network[1] - bottom), (left, geometry.network[0] - right)]
        # mirrored as the network's own ReflectionPad2d pads (numpy repeats a 1-pixel side)
        array = np.pad(array, pad + [(0, 0)] * (array.ndim - 2), mode="reflect")
    return chw_tensor(array)


def inference_draft_size(mode: str, load_size: int, crop_size: int) -> int | None:
    """The `draft_to` for `pipeline.pixels.decode_pixels` before `inference_pixels` in `mode`: JPEGs
    much larger than the target decode with DCT scaling. Faster, but not bit-exact with the official
    inputs; pass `draft_to=None` where that matters."""
    return {"official": crop_size, "shortside": load_size}.get(mode)
