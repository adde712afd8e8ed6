"""Data side of bulk translation: decoded, preprocessed batches per work unit, and encoded outputs.

``UnitBatches`` runs in DataLoader workers: it reads each unit, decodes and preprocesses every
input, groups same-sized images into batches and reports unreadable inputs as error records, so
the job's main process only runs the model, and encodes and writes in its thread pool.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import posixpath
import tarfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline import storage
from pipeline.corpus import WorkUnit, read_unit
from pipeline.keys import UnsafeKeyError
from pipeline.png import encode_png
from pipeline.shards import ShardIndex, ShardInfo, index_url
from pipeline.transforms import ImageDecodeError, decode_rgb, full_size, test_draft_size, test_pixels

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class Preprocess:
    """How inputs become network inputs (see ``pipeline.transforms.test_transform``)."""

    mode: str = "official"
    load_size: int = 256
    crop_size: int = 256
    max_pixels: int = 64 * 2**20


def error_record(
    order: int, key: str, source_url: str, error: str, detail: str, size: int, dims=(None, None)
) -> dict:
    """A manifest row for an input that has no output: `error` is a code of manifest.ERROR_CODES."""
    return {
        "order": order,
        "key": key,
        "source_url": source_url,
        "status": "error",
        "error": error,
        "error_detail": detail,
        "width": dims[0],
        "height": dims[1],
        "input_bytes": size,
    }


class UnitBatches(IterableDataset):
    """Yields, per unit of this DataLoader worker's share (unit j -> worker j % workers):
    ``{"unit", "x", "meta"}`` batches of one image size, then ``{"unit", "end", "errors", "count"}``."""

    def __init__(self, units: Sequence[WorkUnit], preprocess: Preprocess, batch_size: int) -> None:
        self.units = list(units)
        self.pre = preprocess
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for j, unit in enumerate(self.units):
            if j % workers == worker:
                yield from self._unit(unit)

    def _unit(self, unit: WorkUnit) -> Iterator[dict[str, Any]]:
        pre = self.pre
        groups: dict[tuple[int, int], list[tuple[torch.Tensor, dict]]] = {}
        errors = []
        count = 0
        draft = test_draft_size(pre.mode, pre.load_size, pre.crop_size)
        items = read_unit(unit)
        for order in itertools.count():
            t0, c0 = time.perf_counter(), time.thread_time()
            item = next(items, None)
            if item is None:
                break
            c1 = time.thread_time()
            count += 1
            size = len(item.data) if item.data is not None else 0
            if item.data is None:
                errors.append(
                    error_record(order, item.key, item.source_url, item.error, item.error_detail, size)
                )
                continue
            try:
                img = decode_rgb(item.data, draft_to=draft, max_pixels=pre.max_pixels)
                displayed = full_size(img)
                c2 = time.thread_time()
                x = test_pixels(img, pre.mode, pre.load_size, pre.crop_size)
            except ImageDecodeError as exc:
                errors.append(error_record(order, item.key, item.source_url, exc.reason, exc.detail, size))
                continue
            except Exception as exc:  # whatever else one image can do: its row says so; the job goes on
                detail = f"{type(exc).__name__}: {exc}"
                errors.append(error_record(order, item.key, item.source_url, "corrupt", detail, size))
                continue
            meta = {
                "order": order,
                "key": item.key,
                "source_url": item.source_url,
                "width": displayed[0],
                "height": displayed[1],
                "input_bytes": size,
                "restore": displayed if pre.mode == "none" else None,
                "prep_ms": 1000 * (time.perf_counter() - t0),  # wall time, for the row's elapsed_ms
                "cpu": {"read": c1 - c0, "decode": c2 - c1, "preprocess": time.thread_time() - c2},
            }
            group = groups.setdefault((x.shape[1], x.shape[2]), [])
            group.append((x, meta))
            if len(group) == self.batch_size:
                yield _batch(unit.index, groups.pop((x.shape[1], x.shape[2])))
        for shape in sorted(groups):
            yield _batch(unit.index, groups[shape])
        yield {"unit": unit.index, "end": True, "errors": errors, "count": count}


def _batch(unit: int, items: list[tuple[torch.Tensor, dict]]) -> dict[str, Any]:
    """One batch: uint8 pixels (scaled on the device, 4x fewer bytes to move than float32), stacked
    straight into shared memory in a DataLoader worker (else its queue copies them there)."""
    first = items[0][0]
    x = torch.empty((len(items), *first.shape), dtype=first.dtype)
    if get_worker_info() is not None:
        x.share_memory_()
    torch.stack([x for x, _ in items], out=x)
    return {"unit": unit, "x": x, "meta": [m for _, m in items]}


def encode_image(pixels: np.ndarray, fmt: str, quality: int, restore: tuple[int, int] | None,
                 png_level: int = 1) -> bytes:
    """HWC uint8 pixels as PNG (`pipeline.png`), JPEG or WebP bytes; ``restore`` resizes back to an
    input's size first."""
    if restore is not None and (pixels.shape[1], pixels.shape[0]) != tuple(restore):
        pixels = np.asarray(Image.fromarray(pixels).resize(tuple(restore), Image.Resampling.BICUBIC))
    if fmt == "png":
        return encode_png(pixels, png_level)
    buffer = io.BytesIO()
    # WebP effort 2: on horse2zebra the files of Pillow's default effort 4 in half the time.
    options = {"method": 2} if fmt == "webp" else {}
    Image.fromarray(pixels).save(buffer, PIL_FORMATS[fmt], quality=quality, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class OutputLayout:
    """Where a job's outputs go: ``OUT/images/<input>/<key>.<ext>`` files, or one
    ``OUT/shards/part-<unit>.tar`` per unit; every URL is checked to lie under OUT."""

    out: str
    format: str = "files"
    image_format: str = "png"
    quality: int = 95
    png_level: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "_inside", storage.within(self.out))

    @property
    def shards_url(self) -> str:
        return storage.join(self.out, "shards")

    def shard_url(self, unit: int) -> str:
        return storage.join(self.shards_url, f"part-{unit:06d}.tar")

    def member_name(self, key: str) -> str:
        return f"{key}.{self.image_format}"

    def image_url(self, unit: WorkUnit, key: str) -> str:
        """The output URL of `key`; UnsafeKeyError if it would not lie under OUT."""
        if self.format == "shards":
            url = f"{self.shard_url(unit.index)}#{self.member_name(key)}"
        else:
            url = storage.join(self.out, "images", str(unit.input_index), self.member_name(key))
        if not self._inside(url.partition("#")[0]) or key.startswith("/") or ".." in key.split("/"):
            raise UnsafeKeyError(f"output {url} would not lie under {self.out}")
        return url

    def encode(self, pixels: np.ndarray, restore: tuple[int, int] | None) -> bytes:
        return encode_image(pixels, self.image_format, self.quality, restore, self.png_level)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_tar(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A WebDataset tar of (name, bytes) members, with fixed metadata so identical input packs identically
    (PAX headers only where a name needs them: long or non-ASCII)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def write_output_index(layout: OutputLayout, samples_per_unit: dict[int, int], extra: dict[str, Any]) -> str:
    """The `_index.json` of a `--format shards` output, so jobs.infer and jobs.train read it as a shard
    set: every unit's tar that holds samples, with its count and size."""
    sizes = storage.list_sizes(layout.shards_url)
    shards = []
    for unit, samples in sorted(samples_per_unit.items()):
        name = posixpath.basename(layout.shard_url(unit))
        if samples:
            if name not in sizes:
                raise FileNotFoundError(f"{layout.shard_url(unit)} is missing, yet unit {unit} is committed")
            shards.append(ShardInfo(name, samples, sizes[name]))
    index = ShardIndex(layout.shards_url, tuple(shards), extra)
    index.save()
    return index_url(layout.shards_url)
