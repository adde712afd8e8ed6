"""SinCUT's model family for jobs.train: the model, and a crop stream drawn from two single images.

``build_sincut(config, runtime)`` gives what the Trainer runs: a ``cut.sincut.SinCUTModel`` and a
``SingleImageStream``. The stream draws each batch's crops (``pipeline.single_image``) from a random
generator seeded by (train.seed, rank, epoch, step) alone, so a resumed run draws exactly the crops an
uninterrupted one would; threads (data.workers) cut the next batches ahead of the step.
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

from cut.sincut import SinCUTModel
from jobs.config import ConfigError, TrainConfig, sincut_config
from jobs.runtime import Runtime
from pipeline import storage
from pipeline.prefetch import ordered_map
from pipeline.single_image import RANDOM_SCALE_MAX, single_image_batch
from pipeline.unpaired import DataSetError, StreamPosition

log = logging.getLogger("jobs.train")

STREAM_KIND = "single_image"
CARD_PREPROCESS = "zoom_and_patch (training); official test: the whole image (jobs.infer --preprocess none)"


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


def build_sincut(config: TrainConfig, runtime: Runtime) -> tuple[SinCUTModel, SingleImageStream]:
    """SinCUT's (model, stream) for the Trainer; one process only (the model has no DDP wrap)."""
    if runtime.distributed:
        raise ConfigError(f"model.preset SinCUT trains in one process; got {runtime.world_size} ranks "
                          "(run python -m jobs.train without torchrun)")
    t, d, m = config.train, config.data, config.model
    a = read_single_image(d.a, "data.a")
    b = read_single_image(d.b, "data.b")
    if m.direction == "BtoA":
        a, b = b, a
    log.info("SinCUT: source %s (%dx%d), target %s (%dx%d)", a.url, *a.image.size, b.url, *b.image.size)
    model = SinCUTModel(sincut_config(config), runtime.device, seed=t.seed)
    stream = SingleImageStream(a, b, t.batch_size, d.crop_size, d.crops_per_epoch, t.seed, d.flip, d.workers,
                               runtime.rank)
    return model, stream
