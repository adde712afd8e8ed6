"""Decode encoded image bytes to RGB and apply the official CUT train and test preprocessing.

Tensors are float32 (3, H, W) in [-1, 1], as torchvision's ToTensor + Normalize(0.5, 0.5) give.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline import formats

# ~67 megapixels (~200 MB as RGB). Pillow's own bomb check (2 x Image.MAX_IMAGE_PIXELS) still applies.
DEFAULT_MAX_PIXELS = 64 * 2**20
TEST_MODES = ("official", "none", "shortside")
_SWAPPED_ORIENTATIONS = {5, 6, 7, 8}


class ImageDecodeError(ValueError):
    """Encoded bytes that are not a usable image; `reason` is its code (`pipeline.manifest.ERROR_CODES`)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageInfo:
    """What ingest records about a checked image."""

    format: str
    width: int
    height: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageDecodeError("empty", "no bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError("too-large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not-an-image", "no image format recognises these bytes") from exc
    except OSError as exc:
        raise _decode_failure(exc) from exc
    if img.format not in formats.MEMBER_EXTENSIONS:
        raise ImageDecodeError("unsupported-format", f"{img.format} images are not decoded by this project")
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError("too-large", f"{width}x{height} exceeds {max_pixels} pixels")
    if width == 0 or height == 0:
        raise ImageDecodeError("corrupt", f"{width}x{height} image")
    return img


def _load(img: Image.Image) -> None:
    try:
        img.load()
    # Pillow's decoders raise many types (OSError, SyntaxError, ValueError, struct.error, ...) on bad data.
    except Exception as exc:
        raise _decode_failure(exc) from exc


def _decode_failure(exc: Exception) -> ImageDecodeError:
    reason = "truncated" if "truncated" in str(exc).lower() else "corrupt"
    return ImageDecodeError(reason, f"{type(exc).__name__}: {exc}")


def inspect_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check that `data` decodes completely within the pixel limit; size as displayed (EXIF applied)."""
    img = _open(data, max_pixels)
    fmt = img.format or "unknown"
    width, height = img.size
    _load(img)
    if img.getexif().get(ExifTags.Base.Orientation) in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(fmt, width, height)


def decode_rgb(data: bytes, *, draft_to: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode to an RGB image with EXIF orientation applied.

    `draft_to`: JPEGs at least twice this size on both sides decode with DCT scaling to no less than
    `draft_to` per side (much faster than decoding full size and resizing down); `full_size` of the
    result still tells the size as displayed before that scaling.
    Raises ImageDecodeError for empty, non-image, too large, truncated or corrupt data.
    """
    img = _open(data, max_pixels)
    displayed = None
    if draft_to and img.format == "JPEG":  # a JPEG's EXIF is in its header: reading it decodes nothing
        swapped = img.getexif().get(ExifTags.Base.Orientation) in _SWAPPED_ORIENTATIONS
        displayed = (img.height, img.width) if swapped else img.size
        img.draft("RGB", (draft_to, draft_to))
    _load(img)
    try:
        ImageOps.exif_transpose(img, in_place=True)
        rgb = _to_rgb(img)
    except Exception as exc:  # a broken EXIF block or palette, found only now
        raise _decode_failure(exc) from exc
    rgb.info[_FULL_SIZE] = displayed or rgb.size
    return rgb


_FULL_SIZE = "cut_full_size"


def full_size(img: Image.Image) -> tuple[int, int]:
    """Width and height of a `decode_rgb` result as displayed, before any DCT scaling."""
    return img.info.get(_FULL_SIZE, img.size)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L"):
        # 16-bit grayscale: Pillow's convert would clip at 255 instead of scaling.
        eight_bit = (np.asarray(img).astype(np.uint32) >> 8).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(eight_bit)
    return img.convert("RGB")


def _uint8_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 copy of an RGB image, channels-last in memory (torch's fastest resize layout)."""
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def to_tensor(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) to float32 in [-1, 1], with the arithmetic of ToTensor + Normalize(0.5, 0.5)."""
    return pixels.float().div_(255.0).sub_(0.5).div_(0.5)


def resize_uint8(chw: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic resize of a uint8 (3, H, W) tensor with Pillow's filter (a = -0.5, antialiased).

    Torch's uint8 kernel is about twice as fast as Pillow's and agrees with it within 2 levels.
    """
    if chw.shape[1:] == (height, width):
        return chw
    out = F.interpolate(chw.unsqueeze(0), size=(height, width), mode="bicubic", antialias=True,
                        align_corners=False)
    return out[0]


def train_crop(img: Image.Image, rng: np.random.Generator, load_size: int, crop_size: int,
               flip: bool = True, decay: bool = False) -> torch.Tensor:
    """`train_transform` before the scaling to float: a uint8 (3, crop, crop) tensor.

    Batches convert to float once for the whole stack, which is cheaper than per image.
    """
    if crop_size % 4:
        raise ValueError(f"crop_size must be a multiple of 4, got {crop_size}")
    size = crop_size if decay else load_size
    if size < crop_size:
        raise ValueError(f"load_size {load_size} is smaller than crop_size {crop_size}")
    chw = resize_uint8(_uint8_tensor(img), size, size)
    top, left = rng.integers(0, size - crop_size + 1, size=2)
    chw = chw[:, top:top + crop_size, left:left + crop_size]
    if flip and rng.random() < 0.5:
        chw = chw.flip(-1)
    return chw


def train_transform(img: Image.Image, rng: np.random.Generator, load_size: int, crop_size: int,
                    flip: bool = True, decay: bool = False) -> torch.Tensor:
    """The official `resize_and_crop` training transform.

    Bicubic resize to load_size x load_size (aspect ignored), random crop_size crop, random horizontal
    flip, scale to [-1, 1]. In the LR-decay phase (`decay`) the official dataset sets load_size to
    crop_size: a plain resize with no crop jitter; the flip stays.
    """
    return to_tensor(train_crop(img, rng, load_size, crop_size, flip, decay))


def round_to_multiple(img: Image.Image, base: int = 4) -> Image.Image:
    """Bicubic resize to the nearest multiple of `base` per side (the official `__make_power_2`)."""
    width, height = img.size
    new = (max(base, round(width / base) * base), max(base, round(height / base) * base))
    return img if new == img.size else img.resize(new, Image.Resampling.BICUBIC)


def test_transform(img: Image.Image, mode: str, load_size: int, crop_size: int) -> torch.Tensor:
    """The network input of `test_pixels`, in [-1, 1]."""
    return to_tensor(test_pixels(img, mode, load_size, crop_size))


def test_pixels(img: Image.Image, mode: str, load_size: int, crop_size: int) -> torch.Tensor:
    """Test-time preprocessing with Pillow's resize, as uint8 (3, H, W) (bit-exact with the official
    test inputs when the image was decoded at full size; `to_tensor` scales them).

    `official`: resize to crop_size x crop_size, as test.py does (its load_size defaults to the crop).
    `none`: keep the size, rounded to a multiple of 4 for the network.
    `shortside`: resize so the shortest side is load_size, keeping the aspect ratio (the official
    `scale_shortside` only ever enlarges; this also shrinks large inputs).
    """
    if mode == "official":
        img = img.resize((crop_size, crop_size), Image.Resampling.BICUBIC)
    elif mode == "shortside":
        scale = load_size / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    elif mode != "none":
        raise ValueError(f"unknown preprocess mode {mode!r}; expected one of {TEST_MODES}")
    return _uint8_tensor(round_to_multiple(img))


test_transform.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name
test_pixels.__test__ = False  # type: ignore[attr-defined]


def test_draft_size(mode: str, load_size: int, crop_size: int) -> int | None:
    """The `draft_to` for `decode_rgb` before `test_transform` in `mode`: JPEGs much larger than the
    target decode with DCT scaling. Faster, but not bit-exact with the official inputs; pass
    `draft_to=None` where that matters."""
    return {"official": crop_size, "shortside": load_size}.get(mode)


test_draft_size.__test__ = False  # type: ignore[attr-defined]
