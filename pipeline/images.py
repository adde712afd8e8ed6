"""Images for evaluation, streamed from any source: shard sets, listings and translation outputs.

A source is a shard set (folder or `_index.json`), a raw listing (folder, prefix, glob, `.txt` or
`.parquet` of URLs), or an inference output folder (`OUT/manifest/*.parquet`), whose `ok` rows give
the translated images and the inputs they came from. Stages: encoded images in source order, decode
and the official test preprocessing, batches. Unreadable images are logged and skipped.
"""

from __future__ import annotations

import itertools
import logging
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from pipeline import storage
from pipeline.corpus import plan_units, read_unit
from pipeline.manifest import manifest_dir, read_manifest
from pipeline.pixels import decode_pixels
from pipeline.shards import iter_shard
from pipeline.transforms import ImageDecodeError, test_transform

log = logging.getLogger(__name__)

_UNIT_SIZE = 256  # images per listing chunk; only bounds the URL batches read in a row


@dataclass(frozen=True)
class EvalImage:
    """One encoded image: its key, where it was read from, its bytes."""

    key: str
    url: str
    data: bytes


@dataclass(frozen=True)
class TranslatedPair:
    """A manifest row that succeeded: the input's URL and its translation's URL."""

    key: str
    source_url: str
    output_url: str


def is_translation_output(url: str) -> bool:
    """Whether `url` is an inference output folder (it has a `manifest/` folder)."""
    return storage.exists(manifest_dir(url.rstrip("/")))


def translated_pairs(out_url: str) -> list[TranslatedPair]:
    """The `ok` rows of an inference output's manifest, in manifest order."""
    table = read_manifest(out_url.rstrip("/"), columns=["key", "source_url", "output_url", "status"])
    rows = table.to_pylist()
    skipped = sum(row["status"] != "ok" for row in rows)
    if skipped:
        log.info("%s: %d of %d manifest rows are errors and not evaluated", out_url, skipped, len(rows))
    return [TranslatedPair(r["key"], r["source_url"], r["output_url"]) for r in rows if r["status"] == "ok"]


def _container(url: str) -> str:
    """The tar holding a `<shard>.tar#<member>` URL, or "" for a plain object."""
    head, sep, _ = url.partition("#")
    return head if sep and head.endswith(".tar") else ""


def read_urls(items: Iterable[tuple[str, str]]) -> Iterator[EvalImage]:
    """Read `(key, url)` items in order. `<shard>.tar#<member>` URLs (shard inputs and shard outputs)
    are tar members: each run of members of one tar costs one pass over it."""
    for tar_url, group in itertools.groupby(items, key=lambda item: _container(item[1])):
        if tar_url:
            yield from _read_members(tar_url, list(group))
            continue
        for key, url in group:
            try:
                yield EvalImage(key, url, storage.read_bytes(url))
            except OSError as exc:
                log.warning("skipping %s: unreadable (%s: %s)", url, type(exc).__name__, exc)


def _read_members(tar_url: str, wanted: Sequence[tuple[str, str]]) -> Iterator[EvalImage]:
    by_member = {url.partition("#")[2]: (key, url) for key, url in wanted}
    found: dict[str, bytes] = {}
    try:
        for sample in iter_shard(tar_url):
            for ext, value in sample.items():
                name = f"{sample['__key__']}.{ext}"
                if name in by_member and isinstance(value, bytes):
                    found[name] = value
            if len(found) == len(by_member):
                break
    except (OSError, tarfile.TarError, ValueError) as exc:  # missing, truncated or corrupt: skip the rest
        log.warning("shard %s unreadable (%s: %s)", tar_url, type(exc).__name__, exc)
    for name, (key, url) in by_member.items():
        if name in found:
            yield EvalImage(key, url, found[name])
        else:
            log.warning("skipping %s: not in %s", url, tar_url)


def iter_encoded(url: str) -> Iterator[EvalImage]:
    """Every image of a source in order; for an inference output, its translated images."""
    if is_translation_output(url):
        yield from read_urls((p.key, p.output_url) for p in translated_pairs(url))
        return
    for unit in plan_units([url], _UNIT_SIZE):
        for item in read_unit(unit):
            if item.data is None:
                log.warning("skipping %s: %s: %s", item.source_url, item.error, item.error_detail)
            else:
                yield EvalImage(item.key, item.source_url, item.data)


def decode_for_eval(items: Iterable[EvalImage], size: int,
                    channels: int = 3) -> Iterator[tuple[EvalImage, torch.Tensor]]:
    """Each decodable image with its (channels, size, size) tensor in [-1, 1]: the official test
    input (full decode, bicubic resize to the crop size)."""
    for item in items:
        try:
            pixels = decode_pixels(item.data, channels).array
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", item.url, exc)
            continue
        yield item, test_transform(pixels, "official", size, size)


def batched(pairs: Iterable[tuple[EvalImage, torch.Tensor]],
            batch_size: int) -> Iterator[tuple[list[EvalImage], torch.Tensor]]:
    """Groups of up to `batch_size` images with their stacked tensors."""
    it = iter(pairs)
    while chunk := list(itertools.islice(it, batch_size)):
        yield [item for item, _ in chunk], torch.stack([x for _, x in chunk])


def image_batches(url: str, size: int, batch_size: int, channels: int = 3) -> Iterator[torch.Tensor]:
    """(B, channels, size, size) batches in [-1, 1] of every image of a source (held-out evaluation)."""
    for _, x in batched(decode_for_eval(iter_encoded(url), size, channels), batch_size):
        yield x
