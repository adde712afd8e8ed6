"""A corpus to translate, cut into work units: one input shard, or a chunk of a sorted listing.

Unit numbering is a pure function of the inputs (their order, the shard indexes, the sorted
listings), so every worker of a job, and every rerun, sees the same units.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pipeline import storage
from pipeline.ingest import expand_source
from pipeline.shards import INDEX_NAME, ShardIndex, iter_shard

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")


@dataclass(frozen=True)
class WorkUnit:
    """One commit unit: either a shard (``shard_url``) or a chunk of listed files (``urls``)."""

    index: int
    input_index: int
    shard_url: str = ""
    shard_bytes: int | None = None
    expected: int = 0
    urls: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        return self.shard_url or (self.urls[0] if self.urls else "")


@dataclass(frozen=True)
class CorpusItem:
    """One input of a unit: its encoded bytes, or why they could not be read."""

    key: str
    source_url: str
    data: bytes | None
    error: str = ""


def is_shard_set(url: str) -> bool:
    return url.endswith(INDEX_NAME) or storage.exists(storage.join(url, INDEX_NAME))


def _unique_keys(keys: Sequence[str]) -> list[str]:
    """Keys made unique in order (``a.jpg`` and ``a.png`` both key ``a``: the second becomes ``a_2``)."""
    seen: dict[str, int] = {}
    out = []
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
        out.append(key if seen[key] == 1 else f"{key}_{seen[key]}")
    return out


def plan_units(inputs: Sequence[str], unit_size: int) -> list[WorkUnit]:
    """Every unit of the corpus, numbered 0..n-1 in input order."""
    units: list[WorkUnit] = []
    for input_index, url in enumerate(inputs):
        if is_shard_set(url):
            index = ShardIndex.load(url)
            for shard in index.shards:
                units.append(
                    WorkUnit(len(units), input_index, index.url(shard), shard.bytes, expected=shard.samples)
                )
            continue
        sources = expand_source(url)
        if not sources:
            raise FileNotFoundError(f"no images found at {url}")
        keys = _unique_keys([s.key for s in sources])
        for start in range(0, len(sources), unit_size):
            chunk = sources[start : start + unit_size]
            units.append(
                WorkUnit(
                    len(units),
                    input_index,
                    expected=len(chunk),
                    urls=tuple(s.url for s in chunk),
                    keys=tuple(keys[start : start + unit_size]),
                )
            )
    return units


def _image_member(sample: dict[str, object]) -> tuple[str, bytes] | None:
    for ext in IMAGE_MEMBERS:
        if isinstance(sample.get(ext), bytes):
            return ext, sample[ext]  # type: ignore[return-value]
    return None


def read_unit(unit: WorkUnit) -> Iterator[CorpusItem]:
    """The unit's inputs in order. Nothing is lost: what cannot be read becomes an item with an error.

    A shard that is missing or breaks off midway yields error items for the samples the index
    promised but the shard did not deliver.
    """
    if not unit.shard_url:
        for key, url in zip(unit.keys, unit.urls, strict=True):
            try:
                yield CorpusItem(key, url, storage.read_bytes(url))
            except Exception as exc:  # a storage error after retries: this input's row says so
                yield CorpusItem(key, url, None, f"read-error: {type(exc).__name__}: {exc}")
        return
    delivered = 0
    failure = ""
    try:
        for sample in iter_shard(unit.shard_url, unit.shard_bytes):
            key = str(sample["__key__"])
            member = _image_member(sample)
            delivered += 1
            if member is None:
                yield CorpusItem(
                    key, f"{unit.shard_url}#{key}", None, "no-image: the sample has no image member"
                )
            else:
                yield CorpusItem(key, f"{unit.shard_url}#{key}.{member[0]}", member[1])
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        log.error("input shard %s unreadable after %d samples: %s", unit.shard_url, delivered, failure)
    name = posixpath.basename(unit.shard_url)
    for i in range(delivered, unit.expected):
        reason = failure or "the shard holds fewer samples than its index lists"
        yield CorpusItem(f"{name}#missing-{i:06d}", f"{unit.shard_url}#{i}", None, f"shard-error: {reason}")
