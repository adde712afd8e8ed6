"""Tiled translation equals the whole-image output: InstanceNorm statistics of the whole image, halos
that give every output pixel the inputs it sees in the whole image, any size and tile."""

from __future__ import annotations

import pytest
import torch

from cut import ResnetGenerator
from cut.fast import accelerate
from cut.inference import to_uint8
from cut.tiling import plan_steps, tiled_forward


def lively(seed: int = 0, **arch) -> ResnetGenerator:
    """Random weights and biases large enough that every normalisation matters: a tile normalised
    with its own statistics would be off by far more than the tolerance."""
    torch.manual_seed(seed)
    netG = accelerate(ResnetGenerator(**{"ngf": 8, "n_blocks": 2, **arch})).eval()
    with torch.no_grad():
        for p in netG.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return netG


def scene(h: int, w: int, seed: int = 1) -> torch.Tensor:
    """A smooth gradient with noise: statistics that differ from tile to tile."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.linspace(-1, 1, h)[:, None]
    cols = torch.linspace(-1, 1, w)[None, :]
    base = torch.stack([rows * cols, rows.expand(h, w), cols.expand(h, w)])
    return (0.7 * base + 0.3 * torch.rand(3, h, w, generator=g) * 2 - 0.3).clamp(-1, 1)[None]


def whole(netG: ResnetGenerator, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return netG(x)


def test_a_large_image_through_256_pixel_tiles_equals_the_whole_image_output():
    netG = lively()
    x = scene(768, 1024)
    expected, tiled = whole(netG, x), tiled_forward(netG, x, 256)
    assert (tiled - expected).abs().max() <= 1e-4
    assert (to_uint8(tiled).int() - to_uint8(expected).int()).abs().max() <= 1


def test_tiles_translated_on_their_own_would_not_match():
    netG = lively()
    x = scene(128, 128)
    independent = torch.cat([whole(netG, x[..., :64]), whole(netG, x[..., 64:])], dim=-1)
    assert (independent - whole(netG, x)).abs().max() > 0.05  # the statistics matter here


@pytest.mark.parametrize(("h", "w", "tile"), [(100, 68, 32), (36, 520, 64), (520, 36, 64), (64, 64, 256)])
def test_sizes_that_do_not_divide_into_tiles_strips_and_one_tile(h, w, tile):
    netG = lively(seed=2)
    x = scene(h, w, seed=3)
    assert (tiled_forward(netG, x, tile) - whole(netG, x)).abs().max() <= 1e-4


def test_official_variants_without_blur_and_batches_tile_exactly():
    netG = lively(seed=4, antialias=False, antialias_up=False)
    x = torch.cat([scene(96, 80, seed=5), scene(96, 80, seed=6)])
    assert (tiled_forward(netG, x, 32) - whole(netG, x)).abs().max() <= 1e-4


def test_the_plan_and_bad_tiles():
    steps = plan_steps(lively())
    names = [type(s).__name__ for s in steps]
    assert names.count("Normalize") == 1 + 2 + 2 * 2 + 2  # stem, downsampling, 2 per block, upsampling
    assert names.count("Save") == names.count("AddSaved") == 2
    with pytest.raises(ValueError, match="multiple of 4"):
        tiled_forward(lively(), scene(64, 64), 30)


@pytest.mark.slow
def test_jobs_infer_tiles_a_large_input_to_the_whole_image_output(tmp_path):
    import numpy as np
    from PIL import Image
    from test_infer import infer_here

    from cut import export_generator
    from cut.checkpoint import to_bytes
    from pipeline.manifest import read_manifest

    checkpoint = tmp_path / "g.pt"
    checkpoint.write_bytes(to_bytes(export_generator(lively(seed=7), preset="CUT")))
    src = tmp_path / "in"
    src.mkdir()
    pixels = ((scene(768, 1024, seed=8)[0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
    Image.fromarray(pixels).save(src / "big.png")
    outputs, logs = {}, {}
    for tile in ("0", "256"):
        out = tmp_path / f"tile-{tile}"
        done = infer_here("--checkpoint", str(checkpoint), "--input", str(src), "--out", str(out),
                          "--preprocess", "none", "--tile-size", tile, "--workers", "0")
        assert done.returncode == 0, done.stderr
        (row,) = read_manifest(str(out)).to_pylist()
        assert row["status"] == "ok" and (row["out_width"], row["out_height"]) == (1024, 768)
        outputs[tile] = np.asarray(Image.open(row["output_url"])).astype(int)
        logs[tile] = done.stderr
    assert np.abs(outputs["256"] - outputs["0"]).max() <= 1
    assert "larger than 256 network pixels on a side are translated tile by tile" in logs["256"]
    rerun = infer_here("--checkpoint", str(checkpoint), "--input", str(src), "--out",
                       str(tmp_path / "tile-0"), "--preprocess", "none", "--tile-size", "128",
                       "--workers", "0")
    assert rerun.returncode == 2 and "tile_size" in rerun.stderr  # part of the job's identity


def test_activations_spilled_to_disk_give_the_same_output_and_leave_no_files(tmp_path):
    from pipeline.spill import SpillArena

    netG = lively(seed=9)
    x = scene(96, 128, seed=10)
    arena = SpillArena(str(tmp_path / "spool"), threshold=16 * 1024)  # every activation of this size
    spilled = tiled_forward(netG, x, 32, allocate=arena.empty)
    assert arena.spilled_bytes > 0 and list((tmp_path / "spool").iterdir()) == []  # unlinked at once
    assert (spilled - whole(netG, x)).abs().max() <= 1e-4
