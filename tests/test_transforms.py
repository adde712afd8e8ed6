"""Decoding (pipeline.pixels) and the official train/test preprocessing (pipeline.transforms)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from conftest import image_bytes
from image_helpers import decode_rgb, full_size, inference_transform, train_transform
from PIL import Image

from pipeline import transforms
from pipeline.pixels import ImageDecodeError, inspect_image


def _encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def _pil_reference(img: Image.Image, seed: int, load: int, crop: int) -> torch.Tensor:
    """The official transform with Pillow ops and the same random draws as train_transform."""
    rng = np.random.default_rng(seed)
    top, left = rng.integers(0, load - crop + 1, size=2)
    out = img.resize((load, load), Image.Resampling.BICUBIC).crop((left, top, left + crop, top + crop))
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK"])
def test_decode_converts_every_mode_to_rgb(mode: str) -> None:
    fmt = "JPEG" if mode in ("L", "CMYK") else "PNG"
    img = decode_rgb(image_bytes(1, (20, 10), fmt=fmt, mode=mode))
    assert (img.mode, img.size) == ("RGB", (20, 10))


def test_decode_scales_16_bit_grayscale() -> None:
    data = _encode(Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)), "PNG")
    assert np.asarray(decode_rgb(data))[0, 0].tolist() == [128, 128, 128]


def test_decode_applies_exif_orientation() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif)
    assert decode_rgb(data).size == (20, 40)
    assert (inspect_image(data).width, inspect_image(data).height) == (20, 40)


def test_decode_uses_dct_scaling_for_large_jpegs() -> None:
    data = image_bytes(2, (512, 384))
    assert decode_rgb(data, draft_to=96).size == (128, 96)
    assert decode_rgb(data, draft_to=100).size == (256, 192)
    assert decode_rgb(data, draft_to=300).size == (512, 384)


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "empty"),
    (b"just some text, not an image", "not-an-image"),
    (image_bytes(3, (64, 64))[:300], "truncated"),
])
def test_decode_rejects_bad_bytes_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_rgb(data)
    assert info.value.reason == reason


def test_decode_rejects_images_over_the_pixel_limit() -> None:
    with pytest.raises(ImageDecodeError, match="64x64 exceeds 1000 pixels") as info:
        inspect_image(image_bytes(4, (64, 64)), max_pixels=1000)
    assert info.value.reason == "too-large"


def test_train_transform_matches_pillow_official_pipeline() -> None:
    img = decode_rgb(image_bytes(5, (48, 40)))
    for seed in range(6):
        out = train_transform(img, np.random.default_rng(seed), load_size=36, crop_size=32)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
        assert (out - _pil_reference(img, seed, 36, 32)).abs().max() <= 2 / 127.5 + 1e-6


def test_decay_phase_resizes_to_crop_without_jitter() -> None:
    img = decode_rgb(image_bytes(6, (48, 40)))
    plain = transforms.to_tensor(torch.from_numpy(np.array(img.resize((32, 32), Image.Resampling.BICUBIC)))
                                 .permute(2, 0, 1))
    for seed in range(6):
        out = train_transform(img, np.random.default_rng(seed), 36, 32, decay=True)
        gap = min((out - plain).abs().max(), (out - plain.flip(-1)).abs().max())
        assert gap <= 2 / 127.5 + 1e-6


def test_flip_off_never_flips() -> None:
    img = decode_rgb(image_bytes(7, (32, 32)))
    outs = {train_transform(img, np.random.default_rng(s), 32, 32, flip=False).sum().item() for s in range(8)}
    assert len(outs) == 1


def test_official_test_mode_resizes_to_crop_like_pillow() -> None:
    img = decode_rgb(image_bytes(8, (50, 37)))
    out = inference_transform(img, "official", load_size=64, crop_size=32)
    expected = np.array(img.resize((32, 32), Image.Resampling.BICUBIC))
    assert torch.equal(out, transforms.to_tensor(torch.from_numpy(expected).permute(2, 0, 1)))
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize(("mode", "size", "expected"), [
    ("none", (50, 37), (48, 36)),
    ("none", (64, 32), (64, 32)),
    ("shortside", (50, 37), (88, 64)),
    ("shortside", (200, 400), (64, 128)),
])
def test_test_modes_keep_sizes_network_friendly(mode: str, size: tuple[int, int],
                                                expected: tuple[int, int]) -> None:
    img = decode_rgb(image_bytes(9, size))
    out = inference_transform(img, mode, load_size=64, crop_size=32)
    assert out.shape == (3, expected[1], expected[0])


def test_unknown_test_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown preprocess mode"):
        inference_transform(Image.new("RGB", (8, 8)), "zoom", 8, 8)


def test_full_size_is_the_displayed_size_before_dct_scaling():
    from PIL import ExifTags

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # rotated: displayed as 400 wide, 600 high
    buffer = io.BytesIO()
    Image.new("RGB", (600, 400), (10, 20, 30)).save(buffer, "JPEG", exif=exif)
    drafted = decode_rgb(buffer.getvalue(), draft_to=100)
    assert full_size(drafted) == (400, 600) and max(drafted.size) < 600
    whole = decode_rgb(buffer.getvalue())
    assert full_size(whole) == whole.size == (400, 600)


def test_16_bit_training_pixels_flip_as_8_bit_ones_do() -> None:
    """torch has no uint16 flip kernel: a 16-bit PNG in a training set stopped training whenever the
    random flip fired."""
    pixels = np.random.default_rng(0).integers(0, 65535, (40, 44, 3), dtype=np.uint16)
    mirrored = 0
    for seed in range(8):
        crop = transforms.train_crop(pixels, np.random.default_rng(seed), 36, 32)
        kept = transforms.train_crop(pixels, np.random.default_rng(seed), 36, 32, flip=False)
        assert crop.dtype == torch.uint16
        if not torch.equal(crop, kept):
            assert np.array_equal(crop.numpy(), kept.numpy()[..., ::-1])
            mirrored += 1
    assert 0 < mirrored < 8
