"""The fast PNG encoder (pipeline.png): lossless, readable by Pillow, every channel count and level."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline import png
from pipeline.pixels import decode_pixels


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return np.asarray(img)


@pytest.mark.parametrize("shape", [(37, 53, 3), (1, 1, 3), (5, 1, 4), (16, 9), (8, 8, 2)])
@pytest.mark.parametrize("level", [0, 1, 6, 9])
def test_pixels_round_trip_exactly(shape, level):
    rng = np.random.default_rng(sum(shape) + level)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[: shape[0] // 2] //= 7  # flat and busy regions both
    assert np.array_equal(decoded(png.encode_png(pixels, level)), pixels)


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_sixteen_bit_pixels_round_trip_exactly(channels):
    """16-bit samples big-endian in the file: Pillow reads grey in full; pipeline.pixels the rest."""
    pixels = np.random.default_rng(channels).integers(0, 65536, (9, 11, channels), dtype=np.uint16)
    data = png.encode_png(pixels)
    assert data[24] == 16  # the IHDR bit depth
    assert np.array_equal(decode_pixels(data, channels).array, pixels)
    if channels == 1:
        assert np.array_equal(decoded(data), pixels[:, :, 0])


def test_without_isal_zlib_gives_the_same_pixels(monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    fast = png.encode_png(pixels)
    monkeypatch.setattr(png, "isal_zlib", None)
    assert np.array_equal(decoded(png.encode_png(pixels)), decoded(fast))


def test_a_smooth_image_compresses_and_bad_input_is_refused():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    smooth = np.dstack([ramp, ramp.T, ramp // 2])
    assert len(png.encode_png(smooth)) < smooth.nbytes / 20
    with pytest.raises(ValueError, match="uint8 or uint16"):
        png.encode_png(smooth.astype(np.float32))
    with pytest.raises(ValueError, match="cannot encode"):
        png.encode_png(np.zeros((4, 4, 5), np.uint8))
