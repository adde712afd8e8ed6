"""Training preprocessing: every official data.preprocess mode, its sizes, the decay-phase rule,
non-square sources, and the config's refusals."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cut import CUTConfig, CUTModel
from jobs.config import ConfigError, TrainConfig, load_config, resolve_train_config
from pipeline.ingest import build_shards
from pipeline.transforms import TRAIN_MODES, train_crop, train_resize

ROOT = Path(__file__).resolve().parent.parent


def official_size(size: tuple[int, int], mode: str, load: int, crop: int) -> tuple[int, int]:
    """The official get_transform's sizes, from its documented steps (docs/official-reference.md §12):
    resize / scale_width / scale_shortside, then RandomCrop where the mode names crop, then the
    nearest multiple of 4 of each side."""
    w, h = size
    if "resize" in mode:
        w, h = load, load
    elif "scale_width" in mode and not (w == load and h >= crop):
        w, h = load, int(max(load * h / w, crop))
    elif "scale_shortside" in mode and min(w, h) < load:
        w, h = round(w * load / min(size)), round(h * load / min(size))
    if "crop" in mode:
        w, h = crop, crop
    return int(round(w / 4) * 4), int(round(h / 4) * 4)


@pytest.mark.parametrize("mode", TRAIN_MODES)
@pytest.mark.parametrize("size", [(50, 37), (37, 50), (64, 64), (90, 41)])
def test_each_mode_gives_the_official_size(mode, size):
    load, crop = 48, 36
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    w, h = official_size(size, mode, load, crop)
    if "crop" in mode and min(train_resize(size, mode, load, crop)) < crop:
        with pytest.raises(ValueError, match="smaller than the 36 crop"):
            train_crop(pixels, np.random.default_rng(1), load, crop, mode=mode)
        return
    out = train_crop(pixels, np.random.default_rng(1), load, crop, mode=mode)
    assert tuple(out.shape) == (3, h, w)


def test_scale_width_keeps_the_aspect_ratio_instead_of_squashing():
    # A square block in a wide image stays square under scale_width; resize_and_crop squashes it.
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[16:24, 36:44] = 255

    def block(mode: str, load: int) -> tuple[int, int]:
        out = train_crop(pixels, np.random.default_rng(0), load, 20, flip=False, mode=mode)[0] > 128
        return int(out.any(1).sum()), int(out.any(0).sum())  # rows, columns

    assert block("scale_width", 40) == (4, 4)
    rows, columns = block("resize_and_crop", 40)
    assert rows >= 1.5 * columns  # 8 rows by 4 columns, less the filter's edge


@pytest.mark.parametrize("mode", ["resize_and_crop", "scale_width_and_crop", "scale_shortside_and_crop"])
def test_the_decay_phase_resizes_to_the_crop_size(mode):
    """Official: past n_epochs the dataset sets load_size = crop_size, for every mode."""
    pixels = np.random.default_rng(2).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    outs = {tuple(train_crop(pixels, np.random.default_rng(s), 40, 32, flip=False, decay=True,
                             mode=mode).flatten().tolist()[:64]) for s in range(4)}
    assert len(outs) == 1  # a 32 image cropped to 32: no jitter left


def test_different_sizes_train_without_identity_and_are_named_with_it():
    torch.manual_seed(0)
    small = {"ngf": 4, "ndf": 4, "n_blocks": 1, "netF_nc": 8, "num_patches": 8}
    a, b = torch.rand(1, 3, 32, 40) * 2 - 1, torch.rand(1, 3, 36, 32) * 2 - 1
    losses = CUTModel(CUTConfig.from_preset("FastCUT", **small)).train_step(a, b)
    assert np.isfinite(losses["G"])
    with pytest.raises(ValueError, match=r"model\.nce_idt"):
        CUTModel(CUTConfig.from_preset("CUT", **small)).train_step(a, b)


def _load(tmp_path: Path, *overrides: str) -> TrainConfig:
    base = [f"data.a={tmp_path}", f"data.b={tmp_path}", f"run.url={tmp_path / 'run'}"]
    return resolve_train_config(load_config(TrainConfig, "configs/tiny.yaml", [*base, *overrides]))


def test_the_config_names_what_the_official_code_cannot_run(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.preprocess.*fixsize"):
        _load(tmp_path, "data.preprocess=fixsize")
    with pytest.raises(ConfigError, match=r"data\.preprocess"):
        _load(tmp_path, "data.preprocess=zoom")
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        _load(tmp_path, "data.preprocess=scale_width", "train.batch_size=2")
    assert _load(tmp_path, "data.preprocess=scale_width_and_crop", "train.batch_size=2").data.preprocess


@pytest.mark.slow
def test_non_square_shards_train_with_crop_and_too_small_images_are_skipped(tmp_path):
    folders = {}
    for name, seed in (("A", 0), ("B", 1)):
        src = tmp_path / f"src-{name}"
        src.mkdir()
        rng = np.random.default_rng(seed)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (36, 52, 3), dtype=np.uint8)).save(src / f"{i}.png")
        # one image too small for the crop: skipped like a corrupt sample, not a crash
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / "tiny.png")
        folders[name] = str(tmp_path / name)
        build_shards([str(src)], folders[name], prefix=name, domain=name, max_count=3, workers=1,
                     progress=False)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "jobs.train", "--config", "configs/tiny.yaml", f"data.a={folders['A']}",
         f"data.b={folders['B']}", f"run.url={tmp_path / 'run'}", "data.preprocess=crop",
         "train.max_steps=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "too-small" in done.stderr
