"""Images for evaluation, streamed from any source: shard sets, listings and translation outputs.

A source is a shard set (folder or `_index.json`), a raw listing (folder, prefix, glob, `.txt` or
`.parquet` of URLs), or an inference output folder (`OUT/manifest/*.parquet`), whose `ok` rows give
the translated images and the inputs they came from. Stages: encoded images in source order, decode
and the official test preprocessing, batches. Unreadable images are logged and skipped.

A manifest is data, so no URL it names is read on trust (`screen_pairs`, `read_outputs`): an output
must lie under its translated set (other stores, schemes and hosts, `.`/`..` segments, plain or
percent-encoded, and symlinks leading out are refused) and hash to its `output_sha256`; an input
must lie under a root the caller names. A row that fails becomes a `Rejection`, never a read.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import tarfile
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from fsspec.utils import get_protocol

from pipeline import storage
from pipeline.corpus import plan_units, read_unit
from pipeline.ingest import glob_root
from pipeline.manifest import manifest_dir, read_manifest
from pipeline.pixels import ImageDecodeError, decode_pixels
from pipeline.sample import EncodedSample
from pipeline.shards import INDEX_NAME, iter_shard
from pipeline.transforms import inference_pixels, to_tensor

log = logging.getLogger(__name__)

_UNIT_SIZE = 256  # images per listing chunk; only bounds the URL batches read in a row


@dataclass(frozen=True)
class TranslatedPair:
    """A manifest row that succeeded: the input's URL, its translation's URL and the translation's hash."""

    key: str
    source_url: str
    output_url: str
    output_sha256: str | None = None


# Why a manifest row is not scored: the codes of `Rejection.reason`.
REJECTION_REASONS = {
    "output-outside": "output_url does not lie under the translated set (another store, scheme or host, "
                      "'.' or '..' segments, or a symlink leading out)",
    "source-outside": "source_url does not lie under a root named with --inputs (or --test-a)",
    "sha256-mismatch": "the output's bytes do not hash to the manifest's output_sha256 (or it has none)",
    "unreadable": "the output or its input could not be read or decoded",
}


@dataclass(frozen=True)
class Rejection:
    """A manifest row left out of scoring: its key, the reason code, the URL at fault and why."""

    key: str
    reason: str
    url: str
    detail: str


class OutsideError(ValueError):
    """A URL named by data lies outside the roots it may be read from."""


class Confinement:
    """Where URLs named by data may be read: at or below the roots the user named. Local paths are
    compared after resolving `..` and symlinks, and read at the resolved path, so what was checked is
    what is read (fsspec reads `%2e` literally there); other stores by protocol and path (host and
    bucket included) with no `.`/`..` segments, plain or percent-encoded, which object stores and
    HTTP servers would each treat their own way."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = [_location(_root(root)) for root in roots]
        self.named = ", ".join(roots)

    def resolve(self, url: str) -> str:
        """The URL to read for `url` (a `<shard>.tar#<member>` URL keeps its member); OutsideError
        if it lies outside every root."""
        if not isinstance(url, str) or not url:
            raise OutsideError(f"no URL ({url!r})")
        head, sep, member = url.partition("#") if _container(url) else (url, "", "")
        if not self.roots:
            raise OutsideError(f"{url}: no root is named to read it from")
        protocol, path = _location(head)
        if protocol != "file" and _has_dot_segment(head):
            raise OutsideError(f"{url} has '.' or '..' path segments")
        for root_protocol, root in self.roots:
            if protocol == root_protocol and (path == root or path.startswith(root.rstrip("/") + "/")):
                return path + sep + member if protocol == "file" else url
        where = f" (resolves to {path})" if protocol == "file" and path != storage.url_path(head) else ""
        raise OutsideError(f"{url}{where} does not lie under {self.named}")


def _root(url: str) -> str:
    """The folder or prefix a named source covers: a glob's fixed folder, a shard index's folder."""
    if storage.has_glob(url):
        url = glob_root(url)
    elif url.endswith("/" + INDEX_NAME):
        url = storage.dirname(url)
    return url.rstrip("/") or url


def _has_dot_segment(url: str) -> bool:
    path = storage.url_path(url)
    return any(part in (".", "..") for text in (path, urllib.parse.unquote(path)) for part in text.split("/"))


def _location(url: str) -> tuple[str, str]:
    """(protocol, path) of where `url`'s bytes are: local paths absolute with symlinks resolved."""
    protocol = get_protocol(url)
    if protocol in storage.LOCAL_PROTOCOLS:
        return "file", os.path.realpath(storage.local_path(url))
    return protocol, storage.url_path(url)


def is_translation_output(url: str) -> bool:
    """Whether `url` is an inference output folder (it has a `manifest/` folder)."""
    return storage.exists(manifest_dir(url.rstrip("/")))


def translated_pairs(out_url: str) -> list[TranslatedPair]:
    """The `ok` rows of an inference output's manifest, in manifest order (as the manifest says: see
    `screen_pairs` before reading any of them)."""
    table = read_manifest(out_url.rstrip("/"),
                          columns=["key", "source_url", "output_url", "output_sha256", "status"])
    rows = table.to_pylist()
    skipped = sum(row["status"] != "ok" for row in rows)
    if skipped:
        log.info("%s: %d of %d manifest rows are errors and not evaluated", out_url, skipped, len(rows))
    return [TranslatedPair(r["key"], r["source_url"], r["output_url"], r["output_sha256"])
            for r in rows if r["status"] == "ok"]


def screen_pairs(pairs: Iterable[TranslatedPair], outputs: Confinement,
                 sources: Confinement | None) -> tuple[list[TranslatedPair], list[Rejection]]:
    """The pairs whose output (and, unless `sources` is None, input) may be read, with the URLs to read
    them at; the others as rejections, logged. Nothing is read here."""
    kept, rejected = [], []
    for pair in pairs:
        try:
            output_url = outputs.resolve(pair.output_url)
        except OutsideError as exc:
            rejected.append(_reject(pair.key, "output-outside", pair.output_url, str(exc)))
            continue
        source_url = pair.source_url
        if sources is not None:
            try:
                source_url = sources.resolve(pair.source_url)
            except OutsideError as exc:
                rejected.append(_reject(pair.key, "source-outside", pair.source_url, str(exc)))
                continue
        kept.append(TranslatedPair(pair.key, source_url, output_url, pair.output_sha256))
    return kept, rejected


def read_outputs(pairs: Sequence[TranslatedPair], rejected: list[Rejection]) -> Iterator[EncodedSample]:
    """The outputs of screened pairs whose bytes hash to their `output_sha256`, before anything decodes
    them; each mismatch is appended to `rejected`."""
    expected = {pair.key: pair.output_sha256 for pair in pairs}
    for item in read_urls((pair.key, pair.output_url) for pair in pairs):
        digest = hashlib.sha256(item.data).hexdigest()
        if digest == expected[item.key]:
            yield item
            continue
        detail = (f"{item.url} hashes to {digest}, the manifest says {expected[item.key]}"
                  if expected[item.key] else f"the manifest gives no output_sha256 for {item.url}")
        rejected.append(_reject(item.key, "sha256-mismatch", item.url, detail))


def _reject(key: str, reason: str, url: str, detail: str) -> Rejection:
    log.warning("rejected %s (%s): %s", key, reason, detail)
    return Rejection(key, reason, url, detail)


def _container(url: str) -> str:
    """The tar holding a `<shard>.tar#<member>` URL, or "" for a plain object."""
    head, sep, _ = url.partition("#")
    return head if sep and head.endswith(".tar") else ""


def read_urls(items: Iterable[tuple[str, str]]) -> Iterator[EncodedSample]:
    """Read `(key, url)` items in order. `<shard>.tar#<member>` URLs (shard inputs and shard outputs)
    are tar members: each run of members of one tar costs one pass over it."""
    for tar_url, group in itertools.groupby(items, key=lambda item: _container(item[1])):
        if tar_url:
            yield from _read_members(tar_url, list(group))
            continue
        for key, url in group:
            try:
                yield EncodedSample(key, url, storage.read_bytes(url))
            except OSError as exc:
                log.warning("skipping %s: unreadable (%s: %s)", url, type(exc).__name__, exc)


def _read_members(tar_url: str, wanted: Sequence[tuple[str, str]]) -> Iterator[EncodedSample]:
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
            yield EncodedSample(key, url, found[name])
        else:
            log.warning("skipping %s: not in %s", url, tar_url)


def iter_encoded(url: str) -> Iterator[EncodedSample]:
    """Every image of a source in order; for an inference output, its translated images that lie under
    it and match their hashes (the others are logged and left out)."""
    if is_translation_output(url):
        pairs, rejected = screen_pairs(translated_pairs(url), Confinement([url]), None)
        yield from read_outputs(pairs, rejected)
        return
    for unit in plan_units([url], _UNIT_SIZE):
        for item in read_unit(unit):
            if item.data is None:
                log.warning("skipping %s: %s: %s", item.url, item.error, item.error_detail)
            else:
                yield item


def decode_for_eval(items: Iterable[EncodedSample], size: int,
                    channels: int = 3) -> Iterator[tuple[EncodedSample, torch.Tensor]]:
    """Each decodable image with its (channels, size, size) tensor in [-1, 1]: the official test
    input (full decode, bicubic resize to the crop size)."""
    for item in items:
        try:
            pixels = decode_pixels(item.data, channels).array
        except ImageDecodeError as exc:
            log.warning("skipping %s: %s", item.url, exc)
            continue
        yield item, to_tensor(inference_pixels(pixels, "official", size, size))


def batched(pairs: Iterable[tuple[EncodedSample, torch.Tensor]],
            batch_size: int) -> Iterator[tuple[list[EncodedSample], torch.Tensor]]:
    """Groups of up to `batch_size` images with their stacked tensors."""
    it = iter(pairs)
    while chunk := list(itertools.islice(it, batch_size)):
        yield [item for item, _ in chunk], torch.stack([x for _, x in chunk])


def image_batches(url: str, size: int, batch_size: int, channels: int = 3) -> Iterator[torch.Tensor]:
    """(B, channels, size, size) batches in [-1, 1] of every image of a source (held-out evaluation)."""
    for _, x in batched(decode_for_eval(iter_encoded(url), size, channels), batch_size):
        yield x
