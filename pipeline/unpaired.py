"""Unpaired A/B training batches from two shard sets, split over DDP ranks and DataLoader workers.

A stream may also be a frozen list of image files (read in chunks standing in for shards) or a
frozen table (`FrozenTable`: a Parquet dataset or Delta snapshot, one row group standing in for a
shard, read with only its image column).

Layout of an epoch, per stream (A or B, each with its own seeds, so B is drawn independently of A):
the shards in an order drawn from (seed, epoch, stream), repeated with a fresh order as often as
needed (a smaller set cycles), form one sequence of positions. An epoch consumes
`world_size * steps_per_epoch * batch_size` positions, with `steps_per_epoch = max(|A|, |B|) //
(world_size * batch_size)`, so every rank yields the same number of batches however uneven the
shards are. Rank r owns a contiguous range of positions; within it, batch j comes from logical
worker j % workers, which owns a contiguous sub-range: ranges are disjoint and cover the set.

A worker reads its range shard by shard, shuffles through a bounded buffer, decodes and augments.
A corrupt sample is replaced by the next good one of the same worker (augmented with the corrupt
sample's own random draws), counted and logged, so batch counts never change. Everything is a
function of (seed, epoch, stream, position), which makes resuming at a step exact: on resume,
physical worker p plays logical worker (p + step) % workers and drops, without decoding, the
batches of its range that were already consumed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline import formats, storage
from pipeline.ingest import expand_source
from pipeline.pixels import ImageDecodeError, check_channels, decode_pixels
from pipeline.sample import EncodedSample
from pipeline.shards import ShardIndex, ShardNotFoundError, iter_shard
from pipeline.tables import (
    TableError,
    TableOptions,
    TablePart,
    TableSpec,
    is_table_file,
    is_table_listing,
    open_table,
    table_samples,
)
from pipeline.transforms import TRAIN_MODES, check_train_size, to_tensor, train_crop

log = logging.getLogger(__name__)

T = TypeVar("T")
A_STREAM, B_STREAM = 0, 1
# Domain tags so the shard order, shuffle and augmentation draws never share a random stream.
_ORDER, _SHUFFLE, _AUGMENT = 0, 1, 2


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: the epoch and the number of batches of it this rank has consumed."""

    epoch: int = 0
    step: int = 0


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(list(entropy))


FILES_PER_CHUNK = 64  # a listing is read as chunks of this many files, each standing in for a shard


@dataclass(frozen=True)
class FrozenTable:
    """A table's part files (as their footers described them at a run's first start) and the column
    spec to read them by: the same rows in the same order on every resume, however the table grows."""

    url: str
    spec: TableSpec
    parts: tuple[TablePart, ...]

    def __len__(self) -> int:
        return sum(p.rows for p in self.parts)

    def to_json(self) -> bytes:
        parts = [{"url": p.url, "name": p.name, "size": p.size, "rows": p.rows,
                  "row_groups": list(p.row_groups), "namespace": p.namespace} for p in self.parts]
        return json.dumps({"url": self.url, "spec": self.spec.to_json(), "parts": parts}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> FrozenTable:
        body = json.loads(data)
        parts = tuple(TablePart(p["url"], p["name"], p["size"], p["rows"], tuple(p["row_groups"]),
                                namespace=p["namespace"]) for p in body["parts"])
        return cls(body["url"], TableSpec.from_json(body["spec"]), parts)


@dataclass(frozen=True)
class ShardSequence:
    """A shard set, a frozen list of image files read in chunks as if they were shards, or a frozen
    table read a row group at a time as if each were a shard, laid out as one stream's positions for
    any epoch."""

    urls: tuple[str, ...]
    counts: tuple[int, ...]
    sizes: tuple[int, ...]
    seed: int
    stream: int
    files: tuple[tuple[str, ...], ...] = ()  # per chunk, its files (a listing), else ()
    table: FrozenTable | None = None
    groups: tuple[tuple[int, int], ...] = ()  # per row group of a table: (part, its first row there)

    @classmethod
    def from_index(cls, index: ShardIndex, seed: int, stream: int) -> ShardSequence:
        return cls(tuple(index.url(s) for s in index.shards), tuple(s.samples for s in index.shards),
                   tuple(s.bytes for s in index.shards), seed, stream)

    @classmethod
    def from_files(cls, files: Sequence[str], seed: int, stream: int) -> ShardSequence:
        chunks = tuple(tuple(files[i:i + FILES_PER_CHUNK]) for i in range(0, len(files), FILES_PER_CHUNK))
        names = tuple(f"{chunk[0]} (+{len(chunk) - 1} files)" for chunk in chunks)
        return cls(names, tuple(len(c) for c in chunks), (0,) * len(chunks), seed, stream, chunks)

    @classmethod
    def from_table(cls, table: FrozenTable, seed: int, stream: int) -> ShardSequence:
        # Only the image column is read: keys become the rows' positions (`<part>/<row>`), which is all
        # a skipped sample's log line needs, and no row group is read for its keys alone.
        spec = dataclasses.replace(table.spec, key_column=None, key_from_path=False, keep_columns=())
        table = dataclasses.replace(table, spec=spec)
        names, counts, groups = [], [], []
        for p, part in enumerate(table.parts):
            first = 0
            for g, rows in enumerate(part.row_groups or (part.rows,)):
                names.append(f"{part.url} row group {g}")
                counts.append(rows)
                groups.append((p, first))
                first += rows
        return cls(tuple(names), tuple(counts), (0,) * len(names), seed, stream, table=table,
                   groups=tuple(groups))

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def name(self) -> str:
        """The shard set's folder (or the first file's, for a listing)."""
        if self.table is not None:
            return self.table.url
        first = self.files[0][0] if self.files else self.urls[0] if self.urls else ""
        return first.rsplit("/", 1)[0]

    def segments(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, int, int]]:
        """(shard, first sample, end sample) runs covering positions [start, stop), in order."""
        position = start
        while position < stop:
            cycle, offset = divmod(position, self.total)
            order = _rng(self.seed, epoch, self.stream, _ORDER, cycle).permutation(len(self.urls))
            before = 0
            for shard in order:
                count = self.counts[shard]
                if before + count > offset:
                    first = offset - before
                    end = min(count, first + stop - position)
                    yield int(shard), first, end
                    position += end - first
                    offset += end - first
                    if position == stop:
                        return
                before += count

    def read(self, epoch: int, start: int, stop: int) -> Iterator[EncodedSample]:
        """Exactly `stop - start` samples, in position order; unreadable ones carry an error."""
        for shard, first, end in self.segments(epoch, start, stop):
            if self.table is not None:
                part, row = self.groups[shard]
                yield from table_samples(self.table.spec, self.table.parts[part], row + first, row + end)
            elif self.files:
                yield from _read_files(self.files[shard][first:end])
            else:
                yield from _read_run(self.urls[shard], self.sizes[shard], first, end)


def _read_files(urls: Sequence[str]) -> Iterator[EncodedSample]:
    for url in urls:
        try:
            yield EncodedSample(url, url, storage.read_bytes(url))
        except OSError as exc:  # read errors after retries: a skipped sample, like a corrupt one
            yield EncodedSample(url, url, None, "read-error", f"{type(exc).__name__}: {exc}")


def _read_run(url: str, size: int, first: int, end: int) -> Iterator[EncodedSample]:
    done = 0
    error = f"shard {url} holds fewer samples than its index lists"
    try:
        for sample in islice(iter_shard(url, size), first, end):
            yield _encoded(url, sample)
            done += 1
    except ShardNotFoundError:
        raise
    except (OSError, EOFError, ValueError, tarfile.TarError) as exc:
        error = f"shard {url} unreadable after sample {first + done}: {exc}"
    for missing in range(done, end - first):
        where = f"{url}#{first + missing}"
        yield EncodedSample(where, where, None, "shard-error", error)


def _encoded(url: str, sample: dict[str, Any]) -> EncodedSample:
    key = str(sample["__key__"])
    images = [k for k in sample if not k.startswith("__") and k != "json"]
    if not images:
        return EncodedSample(key, f"{url}#{key}", None, "no-image", "no image member")
    return EncodedSample(key, f"{url}#{key}.{images[0]}", sample[images[0]])


def shuffled(items: Iterable[T], rng: np.random.Generator, size: int) -> Iterator[T]:
    """`items` reordered through a buffer of `size`: every item once, order drawn from `rng`."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        pick = int(rng.integers(size))
        yield buffer[pick]
        buffer[pick] = item
    for pick in rng.permutation(len(buffer)):
        yield buffer[pick]


# A sample with its position in the stream, which seeds its augmentation.
Positioned = tuple[int, EncodedSample]
# (key of the image used, augmented uint8 tensor, [(key, reason)] of the corrupt sample it stands in for)
Decoded = tuple[str, torch.Tensor, list[tuple[str, str]]]


def decode_filled(items: Iterable[Positioned], decode: Callable[[bytes], T],
                  transform: Callable[[T, int], torch.Tensor], fallback: Callable[[], Iterable[Positioned]],
                  source: str = "") -> Iterator[Decoded]:
    """(key, tensor, skipped) per item; a corrupt item takes the image of the next good one, augmented
    with its own position's draws (`transform(image, position)`).

    `skipped` lists the (key, reason) of the corrupt item it replaces. Corrupt items at the end take
    the first good image of `fallback()`, the worker's whole sequence, so results never depend on
    where a run was resumed.
    """
    holes: list[tuple[Positioned, str]] = []
    for position, item in items:
        image, reason = _try_decode(item, decode)
        if image is None:
            holes.append(((position, item), reason))
            continue
        for (hole_position, hole), why in holes:
            yield item.key, transform(image, hole_position), [(hole.key, why)]
        holes.clear()
        yield item.key, transform(image, position), []
    if holes:
        key, image = _first_good(fallback(), decode, holes[0][0][1].key, source)
        for (hole_position, hole), why in holes:
            yield key, transform(image, hole_position), [(hole.key, why)]


class DataSetError(ValueError):
    """A shard set training cannot use: empty, too small for one batch, or nothing decodable."""


class NoDecodableSampleError(DataSetError):
    """A stream whose samples (this worker's share of them) are all corrupt."""


def _first_good(items: Iterable[Positioned], decode: Callable[[bytes], T], first_bad: str,
                source: str) -> tuple[str, T]:
    for _, item in items:
        image = _try_decode(item, decode)[0]
        if image is not None:
            return item.key, image
    raise NoDecodableSampleError(f"no decodable sample in shard set {source or '?'} (in this data worker's "
                                 f"share of it; first bad: {first_bad}): check it with python -m jobs.shard")


def _try_decode(item: EncodedSample, decode: Callable[[bytes], T]) -> tuple[T | None, str]:
    if item.data is None:
        return None, item.reason
    try:
        return decode(item.data), ""
    except ImageDecodeError as exc:
        return None, str(exc)
    except Exception as exc:  # whatever else one image can raise: skipped like any corrupt sample
        return None, f"corrupt: {type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class EpochPlan:
    """Everything a DataLoader worker needs to produce its batches of one epoch (picklable)."""

    a: ShardSequence
    b: ShardSequence
    epoch: int
    step: int
    steps: int
    rank: int
    workers: int
    batch_size: int
    load_size: int
    crop_size: int
    flip: bool
    decay: bool
    shuffle_buffer: int
    channels: tuple[int, int] = (3, 3)  # of A and of B (pipeline.pixels)
    preprocess: str = "resize_and_crop"  # pipeline.transforms.TRAIN_MODES

    def share(self, logical: int) -> tuple[int, int]:
        """The positions [start, stop) that logical worker `logical` of this rank consumes."""
        start = (self.rank * self.steps + sum(len(range(w, self.steps, self.workers))
                                              for w in range(logical))) * self.batch_size
        return start, start + len(range(logical, self.steps, self.workers)) * self.batch_size

    def batches(self, logical: int) -> Iterator[dict[str, Any]]:
        """The batches of logical worker `logical` from `self.step` on (batches step + k*workers ...)."""
        done = len(range(logical, self.step, self.workers))
        todo = len(range(logical, self.steps, self.workers)) - done
        a = self._samples(self.a, logical, done * self.batch_size)
        b = self._samples(self.b, logical, done * self.batch_size)
        for _ in range(todo):
            a_items = list(islice(a, self.batch_size))
            b_items = list(islice(b, self.batch_size))
            yield {"A": _to_floats([t for _, t, _ in a_items]),
                   "B": _to_floats([t for _, t, _ in b_items]),
                   "A_key": [k for k, _, _ in a_items], "B_key": [k for k, _, _ in b_items],
                   "skipped": [s for _, _, skipped in a_items + b_items for s in skipped]}

    def _order(self, seq: ShardSequence, logical: int) -> Iterator[Positioned]:
        start, stop = self.share(logical)
        rng = _rng(seq.seed, self.epoch, seq.stream, _SHUFFLE, start)
        return shuffled(enumerate(seq.read(self.epoch, start, stop), start), rng, self.shuffle_buffer)

    def _samples(self, seq: ShardSequence, logical: int, skip: int) -> Iterator[Decoded]:
        size = self.crop_size if self.decay else self.load_size
        channels = self.channels[seq.stream != A_STREAM]
        # DCT-scaled JPEG decoding only where every image is resized to a known size anyway.
        draft = size if "resize" in self.preprocess else None

        def decode(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
            """The pixels and the size they are resized to before the crop, checked once here."""
            pixels = decode_pixels(data, channels, draft_to=draft).array
            # skipped, not a crash: the official RandomCrop (or the networks) would stop the run
            resized = check_train_size((pixels.shape[1], pixels.shape[0]), self.preprocess, size,
                                       self.crop_size)
            return pixels, resized

        def transform(image: tuple[np.ndarray, tuple[int, int]], position: int) -> torch.Tensor:
            rng = _rng(seq.seed, self.epoch, seq.stream, _AUGMENT, position)
            pixels, resized = image
            return train_crop(pixels, rng, self.load_size, self.crop_size, self.flip, self.decay,
                              self.preprocess, resized)

        return decode_filled(islice(self._order(seq, logical), skip, None), decode, transform,
                             lambda: self._order(seq, logical), seq.name)


def _to_floats(crops: list[torch.Tensor]) -> torch.Tensor:
    """A batch of uint8 (or uint16) crops in [-1, 1]: scaled once for the stack when all share a depth."""
    if all(c.dtype == crops[0].dtype for c in crops):
        return to_tensor(torch.stack(crops))
    return torch.stack([to_tensor(c) for c in crops])


class _EpochDataset(IterableDataset):
    def __init__(self, plan: EpochPlan) -> None:
        self.plan = plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical, workers = (info.id, info.num_workers) if info else (0, 1)
        if workers != self.plan.workers:
            raise RuntimeError(f"plan made for {self.plan.workers} workers, running with {workers}")
        return self.plan.batches((physical + self.plan.step) % workers)


def _sequence(source: str | Sequence[str] | FrozenTable, seed: int, stream: int) -> ShardSequence:
    if isinstance(source, FrozenTable):
        if not len(source):
            raise DataSetError(f"table {source.url} holds no rows")
        return ShardSequence.from_table(source, seed, stream)
    if not isinstance(source, str):
        if not source:
            raise DataSetError("an image listing with no files")
        return ShardSequence.from_files(source, seed, stream)
    index = ShardIndex.load(source)
    index.check_complete()
    if index.samples == 0:
        raise DataSetError(f"shard set {index.base_url} holds no samples")
    return ShardSequence.from_index(index, seed, stream)


def freeze_listing(url: str, frozen_url: str) -> tuple[str, ...]:
    """The image files a folder, prefix, glob or URL list names, listed once and kept at `frozen_url`
    (one URL a line): later calls read the frozen list, so a resumed run sees the same files in the
    same order whatever the folder holds now."""
    if storage.exists(frozen_url):
        return tuple(storage.read_bytes(frozen_url).decode().splitlines())
    found = expand_source(url)
    urls = tuple(s.url for s in found.sources
                 if formats.extension(s.url) not in formats.UNSUPPORTED and not s.outside)
    if not urls:
        raise DataSetError(f"no images found at {url}")
    if len(urls) > SHARD_ADVICE:
        log.warning("%s: %d image files read one by one; `python -m jobs.shard %s --out ...` packs them "
                    "into shards, which read much faster from object storage", url, len(urls), url)
    storage.write_bytes_atomic(frozen_url, ("\n".join(urls) + "\n").encode())
    return urls


SHARD_ADVICE = 20_000  # files in a listing beyond which shards are worth suggesting


def freeze_source(url: str, frozen_base: str) -> tuple[str, ...] | FrozenTable:
    """What a training domain that is not a shard set names, frozen on a run's first start: a table
    (a Parquet dataset or Delta table of encoded images, as jobs.shard and jobs.infer detect them) at
    `<frozen_base>.table.json`, its parts as their footers say and the Delta version read; else the
    image files of a folder, prefix, glob or URL list at `<frozen_base>.txt` (`freeze_listing`).

    A table's image column must be the only binary or `datasets` Image column: one with several is
    sharded first (`python -m jobs.shard URL --image-column NAME --out ...`)."""
    table_url = f"{frozen_base}.table.json"
    if storage.exists(table_url):
        return FrozenTable.from_json(storage.read_bytes(table_url))
    listing_url = f"{frozen_base}.txt"
    if not storage.exists(listing_url) and _is_table(url):
        try:
            opened = open_table(url)
        except TableError as exc:
            raise DataSetError(f"{exc}; a table training cannot read as it is can be sharded with "
                               f"python -m jobs.shard {url} --image-column NAME --out URL") from exc
        frozen = FrozenTable(url, opened.spec, opened.parts)
        if not len(frozen):
            raise DataSetError(f"table {url} holds no rows")
        storage.write_bytes_atomic(table_url, frozen.to_json())
        return frozen
    return freeze_listing(url, listing_url)


def _is_table(url: str) -> bool:
    if is_table_file(url, TableOptions()):
        return True
    if not (storage.has_glob(url) or storage.is_dir(url)):
        return False
    found = expand_source(url)
    return is_table_listing(url, [s.url for s in found.sources] + found.skipped)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class UnpairedStream:
    """Unpaired A/B batches for one DDP rank; see the module docstring for the layout.

    `a`, `b`: a shard set's `_index.json` URL or the folder holding it, a frozen list of image
    file URLs (`freeze_listing`), or a frozen table (`freeze_source`). `rank` and `world_size`
    default to torchrun's RANK and WORLD_SIZE.
    `workers`: DataLoader worker processes (0 decodes in this process); exact resume needs the same
    count.
    """

    def __init__(self, a: str | Sequence[str] | FrozenTable, b: str | Sequence[str] | FrozenTable, *,
                 load_size: int, crop_size: int,
                 batch_size: int, seed: int, rank: int | None = None, world_size: int | None = None,
                 workers: int = 0, flip: bool = True, shuffle_buffer: int = 256,
                 channels: tuple[int, int] = (3, 3), preprocess: str = "resize_and_crop") -> None:
        self.rank = _env_int("RANK", 0) if rank is None else rank
        self.world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")
        if seed < 0 or batch_size < 1 or workers < 0:
            raise ValueError("seed and workers must be >= 0 and batch_size >= 1")
        self.a, self.b = _sequence(a, seed, A_STREAM), _sequence(b, seed, B_STREAM)
        self.steps_per_epoch = max(self.a.total, self.b.total) // (self.world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise DataSetError(f"{max(self.a.total, self.b.total)} samples cannot fill one batch of "
                               f"{batch_size} on each of {self.world_size} ranks")
        self.seed, self.batch_size, self.workers = seed, batch_size, workers
        self.load_size, self.crop_size, self.flip = load_size, crop_size, flip
        self.shuffle_buffer = shuffle_buffer
        for channel_count in channels:
            check_channels(channel_count)
        self.channels = tuple(channels)
        if preprocess not in TRAIN_MODES:
            raise ValueError(f"unknown preprocess mode {preprocess!r}; expected one of {TRAIN_MODES}")
        self.preprocess = preprocess
        self.skipped = 0

    def plan(self, position: StreamPosition, decay: bool = False) -> EpochPlan:
        """The picklable description of this rank's epoch from `position` on."""
        if not 0 <= position.step <= self.steps_per_epoch:
            raise ValueError(f"step {position.step} outside epoch of {self.steps_per_epoch} steps")
        return EpochPlan(self.a, self.b, position.epoch, position.step, self.steps_per_epoch, self.rank,
                         max(1, self.workers), self.batch_size, self.load_size, self.crop_size, self.flip,
                         decay, self.shuffle_buffer, self.channels, self.preprocess)

    def iterate(self, position: StreamPosition, decay: bool = False) -> Iterator[dict[str, Any]]:
        """Batches `position.step` .. `steps_per_epoch - 1` of the epoch: dicts with `A`, `B` (float32
        (batch, channels, crop, crop) in [-1, 1]) and `A_key`, `B_key` (lists of str). `decay`: the LR-decay
        phase, where the official transform drops the crop jitter."""
        plan = self.plan(position, decay)
        if plan.step == plan.steps:
            return
        loader = iter(DataLoader(_EpochDataset(plan), batch_size=None, num_workers=self.workers,
                                 pin_memory=torch.cuda.is_available()))
        try:
            for batch in loader:
                for key, reason in batch.pop("skipped"):
                    self.skipped += 1
                    log.warning("rank %d: skipped corrupt sample %s (%s)", self.rank, key, reason)
                yield batch
        finally:
            # Stop the workers now when the caller stops early or an error escapes; left to the garbage
            # collector, the shutdown (a join of up to 5 s per worker) lands in whichever thread collects.
            shutdown = getattr(loader, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self, position: StreamPosition) -> dict[str, int]:
        """What a checkpoint stores to resume this stream at `position`."""
        return {"epoch": position.epoch, "step": position.step,
                "samples": position.step * self.batch_size * self.world_size, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size, "workers": self.workers}

    def position_from_state(self, state: dict[str, int]) -> StreamPosition:
        """The position to resume at; exact when the layout (seed, ranks, batch, workers) is unchanged,
        otherwise the step that consumed the same number of samples."""
        layout = ("seed", "world_size", "batch_size", "workers")
        if all(state[k] == getattr(self, k) for k in layout):
            return StreamPosition(state["epoch"], state["step"])
        step = min(state["samples"] // (self.batch_size * self.world_size), self.steps_per_epoch)
        log.warning("data layout changed (%s -> %s): resuming epoch %d at step %d, not bit-exact",
                    {k: state[k] for k in layout}, {k: getattr(self, k) for k in layout},
                    state["epoch"], step)
        return StreamPosition(state["epoch"], step)
