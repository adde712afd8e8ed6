"""The official SinCUT training crops (``--preprocess zoom_and_patch``, ``--dataset_mode singleimage``).

Each crop: resize the whole image by an independent random factor per axis in [1/scale_max, 1]
(never below the crop size, bilinear), lay a grid of crop-sized cells over it at a random offset,
take one cell, flip it left-right with probability 1/2, scale to [-1, 1]. A and B crops are drawn
independently, each from its own image (docs/official-reference.md, section "SinCUT").

``SingleImageStream`` gives jobs.train a SinCUT run's batches: each batch's crops are drawn from a
random generator seeded by (seed, rank, epoch, step) alone, so a resumed run draws exactly the crops an
uninterrupted one would; threads (``workers``) cut the next batches ahead of the step.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.prefetch import ordered_map
from pipeline.transforms import to_tensor
from pipeline.unpaired import DataSetError, StreamPosition

log = logging.getLogger(__name__)

CROP_SIZE = 64
RANDOM_SCALE_MAX = 3.0
DATASET_LENGTH = 100_000  # the official dataset pretends one image holds this many crops (one epoch)
STREAM_KIND = "single_image"
CARD_PREPROCESS = "zoom_and_patch (training); official test: the whole image (jobs.infer --preprocess none)"


def draw_zoom(rng: np.random.Generator, scale_max: float = RANDOM_SCALE_MAX) -> tuple[float, float]:
    """Width and height zoom factors, each uniform in [1/scale_max, 1)."""
    if scale_max < 1:
        raise ValueError(f"scale_max must be >= 1, got {scale_max}")
    low = 1.0 / scale_max
    width_zoom, height_zoom = rng.uniform(low, 1.0, size=2)
    return float(width_zoom), float(height_zoom)


def zoomed_size(size: tuple[int, int], zoom: tuple[float, float], crop_size: int) -> tuple[int, int]:
    """The (width, height) an image of ``size`` is resized to: each side times its zoom, at least
    ``crop_size``, rounded to the nearest integer."""
    width, height = (round(float(max(crop_size, side * z))) for side, z in zip(size, zoom, strict=True))
    return width, height


def zoom_and_patch(
    image: Image.Image,
    rng: np.random.Generator,
    crop_size: int = CROP_SIZE,
    scale_max: float = RANDOM_SCALE_MAX,
    flip: bool = True,
    zoom: tuple[float, float] | None = None,
    patch_index: int | None = None,
) -> torch.Tensor:
    """One official SinCUT training crop of ``image``: a float32 (3, crop_size, crop_size) tensor in [-1, 1].

    ``zoom`` fixes the two zoom factors (else drawn by ``draw_zoom``); ``patch_index`` picks the grid
    cell as ``patch_index % cells`` (else a uniform draw). The official loader takes the index from a
    shuffled permutation of the dataset, so for one crop both are uniform draws.
    """
    if crop_size < 4 or crop_size % 4:
        raise ValueError(f"crop_size must be a positive multiple of 4, got {crop_size}")
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image has no pixels ({image.width}x{image.height})")
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    zoom = draw_zoom(rng, scale_max) if zoom is None else zoom
    if min(zoom) <= 0:
        raise ValueError(f"zoom factors must be positive, got {zoom}")
    width, height = zoomed_size(rgb.size, zoom, crop_size)
    resized = rgb.resize((width, height), Image.Resampling.BILINEAR)

    cells_x, cells_y = width // crop_size, height // crop_size
    start_x = int(rng.integers(width - cells_x * crop_size + 1))
    start_y = int(rng.integers(height - cells_y * crop_size + 1))
    cell = int(rng.integers(cells_x * cells_y)) if patch_index is None else patch_index % (cells_x * cells_y)
    left = start_x + (cell // cells_y) * crop_size  # cells are numbered down each column first
    top = start_y + (cell % cells_y) * crop_size
    pixels = np.asarray(resized)[top : top + crop_size, left : left + crop_size]
    if flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return to_tensor(torch.from_numpy(pixels.copy()).permute(2, 0, 1))


def single_image_batch(
    image_A: Image.Image,
    image_B: Image.Image,
    rng: np.random.Generator,
    batch_size: int,
    crop_size: int = CROP_SIZE,
    scale_max: float = RANDOM_SCALE_MAX,
    flip: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` independent A crops and B crops, each (N, 3, crop_size, crop_size)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    crops_A, crops_B = [], []
    for _ in range(batch_size):
        crops_A.append(zoom_and_patch(image_A, rng, crop_size, scale_max, flip))
        crops_B.append(zoom_and_patch(image_B, rng, crop_size, scale_max, flip))
    return torch.stack(crops_A), torch.stack(crops_B)


@dataclass(frozen=True)
class SingleImage:
    """One domain of a SinCUT run: one image, kept in memory (RGB)."""

    url: str
    image: Image.Image
    total: int = 1  # images in the domain (the model card's count)


def read_single_image(url: str, key: str) -> SingleImage:
    """The image file at ``url`` (any fsspec URL); a folder or a file that is no image is a clear error."""
    if storage.is_dir(url):
        raise DataSetError(f"{key}={url} is a folder; SinCUT takes ONE image file per domain")
    data = storage.read_bytes(url)  # FileNotFoundError names the URL
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataSetError(f"{key}={url} is not an image file Pillow can read ({exc})") from exc
    return SingleImage(url, image)


class SingleImageStream:
    """Batches of independent A and B crops (``single_image_batch``), ``steps_per_epoch`` per epoch."""

    def __init__(self, a: SingleImage, b: SingleImage, batch_size: int, crop_size: int, crops_per_epoch: int,
                 seed: int, flip: bool = True, workers: int = 0, rank: int = 0,
                 scale_max: float = RANDOM_SCALE_MAX) -> None:
        self.a, self.b = a, b
        self.batch_size, self.crop_size, self.seed, self.flip = batch_size, crop_size, seed, flip
        self.workers, self.rank, self.scale_max = workers, rank, scale_max
        self.steps_per_epoch = crops_per_epoch // batch_size  # the official loader drops a partial batch
        self.card_preprocess = CARD_PREPROCESS  # the model card's "preprocess"
        self.skipped = 0  # nothing is ever skipped: the two images are read once, at the start

    def batch(self, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """The crops of one step: a pure function of (seed, rank, epoch, step)."""
        rng = np.random.default_rng([self.seed, self.rank, epoch, step])
        real_A, real_B = single_image_batch(self.a.image, self.b.image, rng, self.batch_size, self.crop_size,
                                            self.scale_max, self.flip)
        return {"A": real_A, "B": real_B}

    def iterate(self, position: StreamPosition, decay: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``position.epoch`` from ``position.step`` on (``decay`` changes nothing here)."""
        steps = range(position.step, self.steps_per_epoch)
        yield from ordered_map(partial(self.batch, position.epoch), steps, self.workers, 2 * self.workers,
                               "sincut-crops")

    def state_dict(self, position: StreamPosition) -> dict[str, Any]:
        return {"kind": STREAM_KIND, "epoch": position.epoch, "step": position.step, "seed": self.seed,
                "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch}

    def position_from_state(self, state: dict[str, Any]) -> StreamPosition:
        if state.get("kind") != STREAM_KIND:
            raise DataSetError("the checkpoint was written by a CUT/FastCUT run, not SinCUT: use another "
                               "run.url")
        same = all(state[k] == getattr(self, k) for k in ("seed", "batch_size", "steps_per_epoch"))
        if not same:
            log.warning("SinCUT stream layout changed since the checkpoint: resuming at its epoch and step, "
                        "not bit-exact")
        return StreamPosition(int(state["epoch"]), min(int(state["step"]), self.steps_per_epoch))
