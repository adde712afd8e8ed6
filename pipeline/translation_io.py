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
from pipeline.pixels import ImageDecodeError, decode_pixels, image_mode
from pipeline.png import encode_png
from pipeline.shards import ShardIndex, ShardInfo, TarWriter, index_url
from pipeline.table_output import TABLE_FORMATS, table_part_url, table_url
from pipeline.transforms import (
    NetworkGeometry,
    geometry_pixels,
    inference_draft_size,
    inference_geometry,
    resize_pixels,
)

PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}
# What each output format stores: channel counts (others become the nearest it has) and bit depths.
FORMAT_CHANNELS = {"png": (1, 2, 3, 4), "jpg": (1, 3), "webp": (3, 4)}  # npy: any
FORMAT_BITS = {"png": (8, 16), "jpg": (8,), "webp": (8,), "npy": (8, 16)}
FORMAT_MAX_SIDE = {"jpg": 65500, "webp": 16383}  # the longest side each encoder writes (libjpeg, libwebp)
OUTPUT_MEMBER_MODE = 0o644  # the permission bits of an output shard's members (shard sets': 0o444)


@dataclass(frozen=True)
class Preprocess:
    """How inputs become network inputs (see ``pipeline.transforms.inference_pixels``)."""

    mode: str = "official"
    load_size: int = 256
    crop_size: int = 256
    max_pixels: int = 64 * 2**20
    channels: int = 3  # the model's input channels (pipeline.pixels)
    multiple: int = 4  # the network's sides are multiples of this
    minimum: int = 8  # ... and at least this long (a ResNet generator's two halvings and its padding)
    max_side: int | None = None  # the longest output side the output format stores (FORMAT_MAX_SIDE)

    def fit(self, size: tuple[int, int], restore: tuple[int, int] | None) -> NetworkGeometry:
        """Where an image of ``size`` (w, h) goes through the network (`inference_geometry`), checked before
        any pixels are resized: ImageDecodeError `too-large` where the mode's resize or the network
        input would hold more than ``max_pixels``, or the output (``restore``, else the network's
        image) too, or a side longer than the output format stores."""
        geometry = inference_geometry(size, self.mode, self.load_size, self.crop_size, self.multiple,
                                      self.minimum)
        out = restore or geometry.resized
        where = f"{size[0]}x{size[1]} under --preprocess {self.mode} (network input " \
                f"{geometry.network[0]}x{geometry.network[1]}, output {out[0]}x{out[1]})"
        if max(geometry.pixels, out[0] * out[1]) > self.max_pixels:
            raise ImageDecodeError("too-large", f"{where}: more than --max-pixels {self.max_pixels} "
                                                f"after resizing")
        if self.max_side is not None and max(out) > self.max_side:
            raise ImageDecodeError("too-large", f"{where}: the output format stores at most {self.max_side} "
                                                f"pixels a side")
        return geometry


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: Python's and Pillow's MemoryError, or torch's CPU
    allocator's RuntimeError."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


def error_record(
    order: int, key: str, source_url: str, error: str, detail: str, size: int, dims=(None, None),
    columns: dict[str, Any] | None = None,
) -> dict:
    """A manifest row for an input that has no output: `error` is a code of manifest.ERROR_CODES;
    `columns`: a table row's kept column values, which error rows keep too."""
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
        "columns": columns,
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
        groups: dict[tuple[int, int, torch.dtype], list[tuple[torch.Tensor, dict]]] = {}
        errors = []
        count = 0
        draft = inference_draft_size(pre.mode, pre.load_size, pre.crop_size)
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
                    error_record(order, item.key, item.url, item.error, item.error_detail, size,
                                 columns=item.columns)
                )
                continue
            dims = (None, None)  # the size, for the row, once decoded
            try:
                decoded = decode_pixels(item.data, pre.channels, draft_to=draft, max_pixels=pre.max_pixels)
                displayed = dims = decoded.displayed
                c2 = time.thread_time()
                restore = displayed if pre.mode == "none" else None
                geometry = pre.fit((decoded.array.shape[1], decoded.array.shape[0]), restore)
                x = geometry_pixels(decoded.array, geometry)
            except ImageDecodeError as exc:
                errors.append(
                    error_record(order, item.key, item.url, exc.reason, exc.detail, size, dims, item.columns)
                )
                continue
            except Exception as exc:  # whatever else one image can do: its row says so; the job goes on
                code = "out-of-memory" if out_of_memory(exc) else "corrupt"
                detail = f"{type(exc).__name__}: {exc}".rstrip(": ")  # a MemoryError says nothing more
                errors.append(error_record(order, item.key, item.url, code, detail, size, dims, item.columns))
                continue
            # the source's alpha the model does not take, for the output (a tensor: the DataLoader turns
            # numpy arrays into tensors anyway; a decoder's read-only view is copied first)
            alpha = decoded.alpha
            if alpha is not None:
                alpha = torch.from_numpy(np.require(alpha, requirements="W"))
            meta = {
                "order": order,
                "key": item.key,
                "source_url": item.url,
                "width": displayed[0],
                "height": displayed[1],
                "input_bytes": size,
                "columns": item.columns,  # a table row's kept columns, for its manifest row
                "restore": restore,
                "box": geometry.box,  # the image within the network's input and output
                "source_mode": decoded.source_mode,
                "alpha": alpha,
                "prep_ms": 1000 * (time.perf_counter() - t0),  # wall time, for the row's elapsed_ms
                "cpu": {"read": c1 - c0, "decode": c2 - c1, "preprocess": time.thread_time() - c2},
            }
            shape = (x.shape[1], x.shape[2], x.dtype)
            group = groups.setdefault(shape, [])
            group.append((x, meta))
            if len(group) == self.batch_size:
                yield _batch(unit.index, groups.pop(shape))
        for shape in sorted(groups, key=str):
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


@dataclass(frozen=True)
class Encoded:
    """An output image: its bytes, the mode stored (``pipeline.pixels.image_mode``) and what the
    format could not hold (``alpha``, ``16-bit``), for the manifest."""

    data: bytes
    mode: str
    dropped: tuple[str, ...] = ()


def output_pixels(pixels: np.ndarray, fmt: str, restore: tuple[int, int] | None = None,
                  alpha: np.ndarray | None = None,
                  box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """The (H, W, C) pixels to store: ``box`` (left, top, right, bottom) cuts the image out of a
    network output mirrored out around it, ``restore`` then resizes back to an input's (w, h); a
    kept source ``alpha`` is put back beside 1- or 3-channel outputs (unchanged where the output has
    the input's size, else resized alike); then fitted to what ``fmt`` stores, naming what was
    dropped."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if box is not None:
        pixels = pixels[box[1]:box[3], box[0]:box[2]]
    if restore is not None:
        pixels = resize_pixels(pixels, tuple(restore))
    if alpha is not None and pixels.shape[2] in (1, 3):
        size = (pixels.shape[1], pixels.shape[0])
        alpha = resize_pixels(alpha, size).astype(pixels.dtype)
        pixels = np.concatenate([pixels, alpha[:, :, None]], axis=2)
    dropped = []
    if 8 * pixels.dtype.itemsize not in FORMAT_BITS[fmt]:
        pixels = (pixels >> 8).astype(np.uint8)
        dropped.append("16-bit")
    if fmt == "npy":
        return np.ascontiguousarray(pixels), tuple(dropped)
    stores = FORMAT_CHANNELS[fmt]
    has_alpha = pixels.shape[2] in (2, 4)
    colour, alpha_plane = pixels[:, :, : pixels.shape[2] - has_alpha], pixels[:, :, pixels.shape[2] - 1:]
    if colour.shape[2] == 1 and not {1, 2} & set(stores):
        colour = np.repeat(colour, 3, axis=2)  # grey into WebP: stored as RGB, nothing lost
    if has_alpha and colour.shape[2] + 1 not in stores:
        dropped.append("alpha")
        has_alpha = False
    pixels = np.concatenate([colour, alpha_plane], axis=2) if has_alpha else colour
    return np.ascontiguousarray(pixels), tuple(dropped)


def encode_image(pixels: np.ndarray, fmt: str, quality: int, restore: tuple[int, int] | None = None,
                 png_level: int = 1, alpha: np.ndarray | None = None,
                 box: tuple[int, int, int, int] | None = None) -> Encoded:
    """HWC uint8/uint16 pixels as PNG (`pipeline.png`), JPEG, WebP or a NumPy array (see
    ``output_pixels``)."""
    pixels, dropped = output_pixels(pixels, fmt, restore, alpha, box)
    mode = image_mode(pixels.shape[2], 8 * pixels.dtype.itemsize)
    if fmt == "png":
        return Encoded(encode_png(pixels, png_level), mode, dropped)
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, pixels, allow_pickle=False)
        return Encoded(buffer.getvalue(), mode, dropped)
    buffer = io.BytesIO()
    # WebP effort 2: on horse2zebra the files of Pillow's default effort 4 in half the time.
    options = {"method": 2} if fmt == "webp" else {}
    Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).save(
        buffer, PIL_FORMATS[fmt], quality=quality, **options)
    return Encoded(buffer.getvalue(), mode, dropped)


@dataclass(frozen=True)
class OutputLayout:
    """Where a job's outputs go: ``OUT/images/<input>/<key>.<ext>`` files, one
    ``OUT/shards/part-<unit>.tar`` per unit, or rows of ``OUT/table`` (pipeline.table_output); every
    URL is checked to lie under OUT."""

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
        elif self.format in TABLE_FORMATS:  # the row's image path in the unit's part, or in the Delta table
            where = table_part_url(self.out, unit.index) if self.format == "table" else table_url(self.out)
            url = f"{where}#{self.member_name(key)}"
        else:
            url = storage.join(self.out, "images", str(unit.input_index), self.member_name(key))
        if not self._inside(url.partition("#")[0]) or key.startswith("/") or ".." in key.split("/"):
            raise UnsafeKeyError(f"output {url} would not lie under {self.out}")
        return url

    def encode(self, pixels: np.ndarray, restore: tuple[int, int] | None,
               alpha: np.ndarray | None = None, box: tuple[int, int, int, int] | None = None) -> Encoded:
        return encode_image(pixels, self.image_format, self.quality, restore, self.png_level, alpha, box)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pack_tar(members: Sequence[tuple[str, bytes]]) -> bytes:
    """One unit's output shard: a WebDataset tar of (name, bytes) members (`pipeline.shards.TarWriter`)."""
    buffer = io.BytesIO()
    with TarWriter(buffer, OUTPUT_MEMBER_MODE) as tar:
        for name, data in members:
            tar.add(name, data)
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
