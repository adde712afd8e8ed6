"""Poison pills: inputs of degenerate sizes (1x1, 3x3, one pixel thin, extreme aspect ratios, sizes
that explode under a resize) become manifest rows with a documented code, their units commit and
_SUCCESS comes; reruns have nothing to do. Training skips such images instead of stopping."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import image_bytes
from PIL import Image
from test_infer import ROOT, infer_here, write_generator
from test_unpaired import _good, _shard_set

from cut import generator_from_checkpoint, read_checkpoint
from cut.inference import to_uint8
from pipeline import storage
from pipeline.manifest import ERROR_CODES
from pipeline.pixels import ImageDecodeError
from pipeline.transforms import check_train_size, inference_geometry, inference_pixels, to_tensor
from pipeline.translation_io import Preprocess
from pipeline.unpaired import StreamPosition, UnpairedStream

# (width, height) of each input; "normal-*" are ordinary images among them
SIZES = {
    "normal-0": (40, 36),
    "normal-1": (36, 44),
    "1x1": (1, 1),
    "3x3": (3, 3),
    "5x5": (5, 5),
    "1x100": (1, 100),
    "1x4000": (1, 4000),
    "4000x1": (4000, 1),
    "2x8000": (2, 8000),
    "1x20000": (1, 20000),
}
MAX_PIXELS = 200_000  # every source fits; resizes that explode past it must not


def pixels(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pills")
    for i, (key, size) in enumerate(SIZES.items()):
        Image.fromarray(pixels(size, i)).save(root / f"{key}.png")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_generator(tmp_path_factory.mktemp("model") / "g.pt")


def too_large(key: str, mode: str, image_format: str) -> bool:
    """What must become `too-large` at --load-size/--crop-size 32 under MAX_PIXELS."""
    width, height = SIZES[key]
    if mode == "shortside":  # the short side to 32: the long one grows by 32 / short
        return width * height * (32 / min(width, height)) ** 2 > MAX_PIXELS
    if mode == "none":  # a one-pixel side is mirrored out to 8 for the network
        network = max(width, 8) * max(height, 8)
        return network > MAX_PIXELS or (image_format == "webp" and max(width, height) > 16383)
    return False


def expected_size(key: str, mode: str) -> tuple[int, int]:
    width, height = SIZES[key]
    if mode == "none":
        return width, height
    if mode == "official":
        return 32, 32
    short = min(width, height)
    return round(width * 32 / short / 4) * 4, round(height * 32 / short / 4) * 4


def run_job(checkpoint: str, folder: Path, out: Path, mode: str, *extra: str):
    """jobs.infer's main in this process (test_infer.infer_here)."""
    return infer_here("--checkpoint", checkpoint, "--input", str(folder), "--out", str(out), "--preprocess",
                      mode, "--load-size", "32", "--max-pixels", str(MAX_PIXELS), "--unit-size", "3",
                      "--workers", "0", *extra)


@pytest.fixture(scope="module")
def translated(checkpoint: str, folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """The output folder of the job in (mode, *extra), run once per module."""
    outs: dict[tuple[str, ...], Path] = {}

    def run(mode: str, *extra: str) -> Path:
        if (mode, *extra) not in outs:
            out = tmp_path_factory.mktemp(mode) / "out"
            done = run_job(checkpoint, folder, out, mode, *extra)
            assert done.returncode == 0, done.stderr[-3000:]
            outs[(mode, *extra)] = out
        return outs[(mode, *extra)]

    return run


@pytest.mark.parametrize("mode, extra", [
    ("none", ()),
    pytest.param("none", ("--tile-size", "64", "--image-format", "webp"), marks=pytest.mark.slow),
    ("official", ()),
    pytest.param("shortside", ("--tile-size", "64"), marks=pytest.mark.slow),
])
def test_degenerate_sizes_become_rows_with_their_code_and_every_unit_commits(checkpoint, folder, translated,
                                                                             mode, extra):
    out = translated(mode, *extra)
    table = pq.read_table(str(out / "manifest"))
    rows = {r["key"]: r for r in table.to_pylist()}
    assert table.num_rows == len(rows) == len(SIZES)
    image_format = "webp" if "webp" in extra else "png"
    for key, row in rows.items():
        assert (row["width"], row["height"]) == SIZES[key]
        if too_large(key, mode, image_format):
            assert (row["status"], row["error"]) == ("error", "too-large"), row
            assert str(MAX_PIXELS) in row["error_detail"] or "16383" in row["error_detail"]
            continue
        assert row["status"] == "ok", row
        assert (row["out_width"], row["out_height"]) == expected_size(key, mode)
        stored = Image.open(io.BytesIO(storage.read_bytes(row["output_url"])))
        assert stored.size == expected_size(key, mode)
    assert (out / "_SUCCESS").exists()
    parts = {p.name: p.read_bytes() for p in (out / "manifest").iterdir()}

    rerun = run_job(checkpoint, folder, out, mode, *extra)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "ok 0, errors 0" in rerun.stdout
    assert {p.name: p.read_bytes() for p in (out / "manifest").iterdir()} == parts


def test_a_small_icon_is_translated_at_its_own_scale_mirrored_out_and_cropped_back(checkpoint, folder,
                                                                                  translated):
    out = translated("none")
    row = next(r for r in pq.read_table(str(out / "manifest")).to_pylist() if r["key"] == "3x3")
    source = np.asarray(Image.open(folder / "3x3.png"))
    x = inference_pixels(source, "none", 32, 32)
    assert tuple(x.shape) == (3, 8, 8)
    assert torch.equal(x[:, 2:5, 2:5], torch.from_numpy(source.copy()).permute(2, 0, 1))  # not resampled
    g = generator_from_checkpoint(read_checkpoint(Path(checkpoint).read_bytes()))
    with torch.no_grad():
        expected = to_uint8(g(to_tensor(x)[None]))[0, :, 2:5, 2:5].permute(1, 2, 0).numpy()
    got = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row["output_url"]))))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


# Runs jobs.infer with its address space limited to what it holds after its imports plus 2 GiB.
LIMITED = """
import resource, runpy, sys
import jobs.infer
held = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (held + 2 * 2**30, resource.RLIM_INFINITY))
sys.argv = ["jobs.infer", *sys.argv[1:]]
runpy.run_module("jobs.infer", run_name="__main__")
"""


@pytest.mark.slow
def test_an_image_the_host_cannot_allocate_for_is_an_out_of_memory_row(checkpoint, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(pixels((40, 36), 0)).save(src / "normal.png")
    Image.fromarray(pixels((1, 16000), 1)).save(src / "thin.png")  # 256x4096000 (4 GiB) at short side 256
    out = tmp_path / "out"
    args = ["--no-progress", "--checkpoint", checkpoint, "--input", str(src), "--out", str(out),
            "--preprocess", "shortside", "--load-size", "256", "--max-pixels", str(2**31), "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")
    done = subprocess.run([sys.executable, "-c", LIMITED, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["key"]: r for r in pq.read_table(str(out / "manifest")).to_pylist()}
    assert rows["normal"]["status"] == "ok"
    assert (rows["thin"]["error"], rows["thin"]["error_detail"]) == ("out-of-memory", "MemoryError")
    assert (rows["thin"]["width"], rows["thin"]["height"]) == (1, 16000)
    assert (out / "_SUCCESS").exists()


@pytest.mark.parametrize("size", [(1, 1), (3, 3), (5, 5), (6, 2), (1, 4000), (4000, 1), (9, 5), (45, 38)])
@pytest.mark.parametrize("mode", ["none", "official", "shortside"])
@pytest.mark.parametrize("multiple, minimum", [(4, 8), (32, 32)])
def test_every_size_becomes_a_network_input_the_network_takes(size, mode, multiple, minimum):
    x = inference_pixels(pixels(size, 0), mode, 16, 16, multiple, minimum)
    height, width = x.shape[1:]
    assert height % multiple == 0 and width % multiple == 0 and min(height, width) >= minimum
    geometry = inference_geometry(size, mode, 16, 16, multiple, minimum)
    assert geometry.network == (width, height)
    left, top, right, bottom = geometry.box
    assert 0 <= left < right <= width and 0 <= top < bottom <= height


def test_the_pixel_cap_holds_after_every_resize_and_says_too_large():
    shortside = Preprocess("shortside", load_size=32, crop_size=32, max_pixels=100_000)
    with pytest.raises(ImageDecodeError) as caught:
        shortside.fit((2, 8000), None)  # 32x128000 at the network
    assert caught.value.reason == "too-large" and "32x128000" in caught.value.detail
    assert shortside.fit((4, 300), None).network == (32, 2400)
    none = Preprocess("none", max_pixels=200_000, max_side=16383)
    with pytest.raises(ImageDecodeError, match=r"too-large.*16383"):
        none.fit((1, 20000), (1, 20000))
    with pytest.raises(ImageDecodeError, match="too-large"):
        none.fit((1, 60000), (1, 60000))  # 60,000 source pixels, 480,000 mirrored out to 8
    assert "too-large" in ERROR_CODES and "out-of-memory" in ERROR_CODES


@pytest.mark.parametrize("mode, size, reason", [
    ("none", (3, 3), "too-small"),
    ("none", (1, 4000), "too-small"),
    ("scale_width", (4000, 1), None),
    ("scale_shortside", (1, 60000), "too-large"),
    ("scale_shortside_and_crop", (1, 60000), "too-large"),
    ("resize_and_crop", (1, 1), None),
    ("crop", (3, 3), "too-small"),
])
def test_training_sizes_are_checked_before_the_resize(mode, size, reason):
    if reason is None:
        check_train_size(size, mode, 36, 32)
        return
    with pytest.raises(ImageDecodeError) as caught:
        check_train_size(size, mode, 36, 32)
    assert caught.value.reason == reason


@pytest.mark.parametrize("mode", ["none", "scale_shortside"])
def test_degenerate_training_images_are_skipped_and_counted(tmp_path: Path, mode: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    degenerate = [("bad-3x3", image_bytes(0, (3, 3), "PNG")),
                  ("bad-1x60000", image_bytes(1, (1, 60000), "PNG"))]
    a = _shard_set(str(tmp_path / "a"), _good("a", 2) + degenerate + _good("c", 2, seed=20), max_count=3)
    b = _shard_set(str(tmp_path / "b"), _good("b", 3), max_count=3)
    stream = UnpairedStream(a, b, batch_size=1, seed=0, rank=0, world_size=1, load_size=36, crop_size=32,
                            preprocess=mode)
    with caplog.at_level(logging.WARNING, logger="pipeline.unpaired"):
        batches = list(stream.iterate(StreamPosition(0, 0)))
    skipped = {"none": {"bad-3x3", "bad-1x60000"}, "scale_shortside": {"bad-1x60000"}}[mode]
    assert stream.skipped == len(skipped)
    assert not {k for batch in batches for k in batch["A_key"]} & skipped
    assert all(min(batch["A"].shape[-2:]) >= 32 and batch["A"].numel() < 2**20 for batch in batches)
