"""Decoding: encoded image bytes to checked pixel arrays with a model's channel count, the first
stage of every image's path (``pipeline.transforms`` sizes them for the network next).

Any source mode becomes 1-4 channels at 8 or 16 bits; ``.npy`` arrays keep any channel count.
A model with ``channels`` inputs sees L (1), LA (2), RGB (3) or RGBA (4) pixels. Colour becomes grey
with Pillow's ITU-R 601-2 luma weights (torchvision's ``Grayscale``), grey becomes RGB by repetition,
a missing alpha is opaque. A source alpha the model does not take (an RGBA image into an RGB model)
is kept aside, to be put back beside the output. 16-bit sources stay 16-bit: grey PNGs through
Pillow, colour PNGs decoded in full here (Pillow keeps only each sample's high byte); the network
later sees ``v / max * 2 - 1`` with max 255 or 65535 (``pipeline.transforms.to_tensor``).
Whatever one file's bytes make a decoder raise becomes an `ImageDecodeError` with its code.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from pipeline import formats

# ~67 megapixels (~200 MB as RGB). Pillow's own bomb check (2 x Image.MAX_IMAGE_PIXELS) still applies.
DEFAULT_MAX_PIXELS = 64 * 2**20
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


def _open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The opened image (header and metadata chunks read, pixels not yet decoded); ImageDecodeError
    for whatever one file's bytes can make Pillow raise here."""
    if not data:
        raise ImageDecodeError("empty", "no bytes")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageDecodeError("not-an-image", "no image format recognises these bytes") from exc
    # Opening parses metadata: a PNG's zTXt/iTXt/iCCP bomb raises ValueError, a bad header SyntaxError,
    # struct.error, EOFError, ... (Pillow has no common base class for them).
    except Exception as exc:
        raise decode_failure(exc) from exc
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
        raise decode_failure(exc) from exc


# What Pillow says when a file asks for more memory than its limits allow (MAX_TEXT_CHUNK,
# MAX_TEXT_MEMORY, MAX_IMAGE_PIXELS): a decompression bomb, not damage.
_BOMB_WORDS = ("too large", "too much memory", "decompression bomb")


def decode_failure(exc: BaseException) -> ImageDecodeError:
    """The code of an exception raised while decoding one file: too-large for a decompression bomb,
    out-of-memory where the host could not allocate what a file within the limits needs, truncated
    for data that ends early, else corrupt."""
    if isinstance(exc, ImageDecodeError):
        return exc
    message = str(exc).lower()
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Image.DecompressionBombError) or any(w in message for w in _BOMB_WORDS):
        return ImageDecodeError("too-large", detail)
    if isinstance(exc, MemoryError):
        return ImageDecodeError("out-of-memory", detail)
    if isinstance(exc, EOFError) or "truncated" in message:
        return ImageDecodeError("truncated", detail)
    return ImageDecodeError("corrupt", detail)


NPY_MAGIC = b"\x93NUMPY"
# Samples an .npy pixel may hold: 64 channels of 8 bits, 32 of 16; more is refused as too-large.
MAX_NPY_BYTES_PER_PIXEL = 64


def read_npy(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """An (H, W, C) uint8/uint16 array from ``.npy`` bytes (never unpickling anything).

    The header is checked before anything is allocated: (H, W) or (H, W, C) of positive sides,
    H x W within ``max_pixels``, at most `MAX_NPY_BYTES_PER_PIXEL` bytes a pixel, and exactly the
    bytes the file holds after its header (a 200-byte file cannot ask for 954 GiB).
    """
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(buffer)  # the header alone: nothing is allocated yet
    except Exception as exc:  # a malformed header: numpy raises ValueError, SyntaxError, ...
        detail = f"not a readable .npy header ({type(exc).__name__}: {exc})"
        raise ImageDecodeError("corrupt", detail) from exc
    if len(shape) not in (2, 3) or dtype.kind != "u" or dtype.itemsize not in (1, 2) or min(shape) < 1:
        raise ImageDecodeError("corrupt", f"a {dtype} array shaped {shape}: expected (H, W) or (H, W, C) "
                                          "of uint8 or uint16")
    if shape[0] * shape[1] > max_pixels:
        raise ImageDecodeError("too-large", f"{shape[1]}x{shape[0]} exceeds {max_pixels} pixels")
    declared = math.prod(shape) * dtype.itemsize
    if declared > shape[0] * shape[1] * MAX_NPY_BYTES_PER_PIXEL:
        raise ImageDecodeError("too-large", f"an array shaped {shape} of {dtype} takes {declared} bytes: "
                                            f"more than {MAX_NPY_BYTES_PER_PIXEL} a pixel")
    held = len(data) - buffer.tell()
    if held != declared:  # checked here, so np.load never allocates what the file does not hold
        reason = "truncated" if held < declared else "corrupt"
        raise ImageDecodeError(reason, f"the header of an array shaped {shape} of {dtype} promises "
                                       f"{declared} bytes of data; the file holds {held}")
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # the header checks above leave nothing known to fail here
        raise decode_failure(exc) from exc
    array = array.astype(np.uint8 if dtype.itemsize == 1 else np.uint16, copy=False)
    return array[:, :, None] if array.ndim == 2 else array


def inspect_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Check that `data` decodes completely within the pixel limit; size as displayed (EXIF applied).

    ImageDecodeError, with its code, for anything one file can make a decoder raise.
    """
    if data.startswith(NPY_MAGIC):
        array = read_npy(data, max_pixels)
        return ImageInfo("NPY", array.shape[1], array.shape[0])
    img = _open_image(data, max_pixels)
    fmt = img.format or "unknown"
    width, height = img.size
    _load(img)
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation)
    except Exception as exc:  # a broken EXIF block is parsed only now
        raise decode_failure(exc) from exc
    if orientation in _SWAPPED_ORIENTATIONS:
        width, height = height, width
    return ImageInfo(fmt, width, height)


CHANNEL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# A 16-bit colour PNG's raw modes, and the raw modes that give its samples' low bytes instead.
_LOW_BYTES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_T = Image.Transpose
_ORIENT = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE, 6: _T.ROTATE_270,
           7: _T.TRANSVERSE, 8: _T.ROTATE_90}


@dataclass
class Pixels:
    """A decoded image: (H, W, C) uint8 or uint16 ``array``; ``alpha`` (H, W), the source's alpha
    where the model's channels hold none, else None; ``displayed`` (w, h) before any DCT scaling."""

    array: np.ndarray
    alpha: np.ndarray | None
    source_mode: str
    displayed: tuple[int, int]

    @property
    def bits(self) -> int:
        return 16 if self.array.dtype == np.uint16 else 8


def image_mode(channels: int, bits: int) -> str:
    """The name the manifest gives pixels: L, LA, RGB, RGBA (5ch, 6ch, ... beyond), ;16 for 16 bits."""
    return CHANNEL_MODES.get(channels, f"{channels}ch") + (";16" if bits == 16 else "")


def check_channels(channels: int) -> None:
    if channels < 1:
        raise ValueError(f"a model takes at least one channel, not {channels}")


def decode_pixels(data: bytes, channels: int, *, draft_to: int | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> Pixels:
    """Decode to ``channels`` channels, EXIF orientation applied, at the source's bit depth.

    ``draft_to``: JPEGs at least twice this size on both sides decode with DCT scaling to no less than
    ``draft_to`` a side (much faster than decoding full size and resizing down); ``displayed`` still
    tells the size before that scaling.
    Raises ImageDecodeError for empty, non-image, too large, truncated or corrupt data.
    """
    check_channels(channels)
    if data.startswith(NPY_MAGIC):
        return _array_pixels(read_npy(data, max_pixels), channels)
    img = _open_image(data, max_pixels)
    source_mode, displayed = img.mode, None
    try:
        sixteen = _png16_samples(data, img, max_pixels)  # before getexif, which decodes a PNG
        orientation = img.getexif().get(ExifTags.Base.Orientation)
        if sixteen is not None:
            source_mode = {4: "RGBA;16", 3: "RGB;16", 2: "LA;16"}[sixteen.shape[2]]
            colour, alpha = _split(_oriented(sixteen, orientation))
        else:
            if draft_to and img.format == "JPEG":  # a JPEG's EXIF is in its header: nothing decoded yet
                displayed = (img.height, img.width) if orientation in _SWAPPED_ORIENTATIONS else img.size
                img.draft("RGB", (draft_to, draft_to))
            _load(img)
            ImageOps.exif_transpose(img, in_place=True)
            colour, alpha = _planes(img)
    except ImageDecodeError:
        raise
    except Exception as exc:  # a broken EXIF block, palette or chunk, found only now
        raise decode_failure(exc) from exc
    array, kept = _to_channels(colour, alpha, channels)
    height, width = array.shape[:2]
    return Pixels(array, kept, source_mode, displayed or (width, height))


def _array_pixels(samples: np.ndarray, channels: int) -> Pixels:
    """An .npy array's samples: as they are when their count is the model's; 1-4 channels convert as
    L, LA, RGB, RGBA do; other counts cannot."""
    count = samples.shape[2]
    source_mode = image_mode(count, 8 * samples.dtype.itemsize)
    size = (samples.shape[1], samples.shape[0])
    if count == channels:
        return Pixels(np.ascontiguousarray(samples), None, source_mode, size)
    if count > 4 or channels > 4:
        raise ImageDecodeError("channel-mismatch", f"a {count}-channel array cannot become the model's "
                                                   f"{channels} channels (only 1-4 channels convert)")
    array, kept = _to_channels(*_split(samples), channels)
    return Pixels(array, kept, source_mode, size)


def _planes(img: Image.Image) -> tuple[np.ndarray, np.ndarray | None]:
    """Colour (H, W, 1 or 3) and alpha (H, W) or None of a decoded Pillow image."""
    if img.mode in _SIXTEEN_BIT_GREY:
        grey = np.asarray(img)
        if img.mode == "I":  # 32-bit integers: 16-bit sources in some formats; clip the rest
            grey = grey.clip(0, 65535)
        return grey.astype(np.uint16)[:, :, None], None
    alpha = None
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        with_alpha = img.convert("LA" if img.mode in ("L", "LA", "La") else "RGBA")
        alpha = np.asarray(with_alpha)[:, :, -1]
    colour = np.asarray(img.convert("L" if img.mode in ("L", "LA", "La", "1") else "RGB"))
    return (colour[:, :, None] if colour.ndim == 2 else colour), alpha


def _split(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    has_alpha = samples.shape[2] in (2, 4)
    colour = samples[:, :, : samples.shape[2] - has_alpha]
    return colour, (samples[:, :, -1] if has_alpha else None)


def _to_channels(colour: np.ndarray, alpha: np.ndarray | None,
                 channels: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(pixels with `channels` channels, the alpha kept aside or None)."""
    wants_colour = channels >= 3
    if wants_colour and colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    elif not wants_colour and colour.shape[2] == 3:
        colour = luma(colour)
    if channels in (1, 3):
        return np.ascontiguousarray(colour), alpha
    opaque = np.iinfo(colour.dtype).max
    plane = np.full(colour.shape[:2], opaque, colour.dtype) if alpha is None else alpha.astype(colour.dtype)
    return np.concatenate([colour, plane[:, :, None]], axis=2), None


def luma(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 1) grey of (H, W, 3) RGB with Pillow's fixed-point ITU-R 601-2 weights, at 8 or 16 bits."""
    r, g, b = (rgb[:, :, i].astype(np.uint64) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(rgb.dtype)[:, :, None]


def _png16_samples(data: bytes, img: Image.Image, max_pixels: int) -> np.ndarray | None:
    """Every bit of a 16-bit colour or grey+alpha PNG as (H, W, C) uint16; None for other images.

    Pillow's PNG decoder unfilters with the pixel stride of the raw mode it unpacks, then keeps the
    high bytes; unpacking a second time with the matching little-endian raw mode gives the low bytes.
    Grey+alpha (4 bytes a pixel) unpacks as raw RGBA bytes in one pass.
    """
    if img.format != "PNG" or len(img.tile) != 1:
        return None
    rawmode = img.tile[0].args if isinstance(img.tile[0].args, str) else img.tile[0].args[0]
    if rawmode == "LA;16B":
        raw = _decode_as(data, max_pixels, "RGBA").astype(np.uint16)
        return np.stack([raw[..., 0] << 8 | raw[..., 1], raw[..., 2] << 8 | raw[..., 3]], axis=2)
    if rawmode not in _LOW_BYTES:
        return None
    high = _decode_as(data, max_pixels, rawmode).astype(np.uint16)
    low = _decode_as(data, max_pixels, _LOW_BYTES[rawmode])
    return high << 8 | low


def _decode_as(data: bytes, max_pixels: int, rawmode: str) -> np.ndarray:
    img = _open_image(data, max_pixels)
    tile = img.tile[0]
    args = rawmode if isinstance(tile.args, str) else (rawmode, *tile.args[1:])
    img.tile = [tile._replace(args=args)]
    _load(img)
    return np.asarray(img)


def _oriented(samples: np.ndarray, orientation: int | None) -> np.ndarray:
    """EXIF orientation applied to an (H, W, C) array, as Pillow's ``exif_transpose`` does."""
    if orientation not in _ORIENT:
        return samples
    planes = [np.asarray(Image.fromarray(samples[:, :, c]).transpose(_ORIENT[orientation]))
              for c in range(samples.shape[2])]
    return np.stack(planes, axis=2)
