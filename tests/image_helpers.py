"""The decode chain composed the way tests look at it: RGB Pillow images and float tensors in one call."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from pipeline.pixels import decode_pixels
from pipeline.transforms import inference_pixels, to_tensor, train_crop

_DISPLAYED = "displayed"


def decode_rgb(data: bytes, *, draft_to: int | None = None) -> Image.Image:
    """`decode_pixels` to 3 channels as an 8-bit RGB image (16-bit samples keep their high byte);
    `full_size` gives its size as displayed before any DCT scaling."""
    pixels = decode_pixels(data, 3, draft_to=draft_to)
    array = (pixels.array >> 8).astype(np.uint8) if pixels.bits == 16 else pixels.array
    img = Image.fromarray(array)
    img.info[_DISPLAYED] = pixels.displayed
    return img


def full_size(img: Image.Image) -> tuple[int, int]:
    """Width and height of a `decode_rgb` result as displayed, before any DCT scaling."""
    return img.info[_DISPLAYED]


def train_transform(img: Image.Image | np.ndarray, rng: np.random.Generator, load_size: int, crop_size: int,
                    flip: bool = True, decay: bool = False, mode: str = "resize_and_crop") -> torch.Tensor:
    """The official training transform in [-1, 1] (`train_crop`, then `to_tensor`)."""
    return to_tensor(train_crop(img, rng, load_size, crop_size, flip, decay, mode))


def inference_transform(img: Image.Image | np.ndarray, mode: str, load_size: int,
                        crop_size: int) -> torch.Tensor:
    """The network input of `inference_pixels`, in [-1, 1]."""
    return to_tensor(inference_pixels(img, mode, load_size, crop_size))
