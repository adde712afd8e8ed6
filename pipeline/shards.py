"""WebDataset shard sets: writing size-limited tar shards, the shard index, and reading samples back.

A shard set is a folder (any URL) of `<prefix>-%06d.tar` files plus `_index.json`, which lists every
shard with its sample count and bytes, so readers know dataset sizes without scanning.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import IO

from pipeline import storage
from pipeline.keys import UnsafeKeyError, member_key

INDEX_NAME = "_index.json"
REJECTS_NAME = "_rejects.jsonl"
INDEX_VERSION = 1
TAR_BLOCK = 512


class ShardIndexNotFoundError(FileNotFoundError):
    """No `_index.json` where a shard set was expected."""


class ShardNotFoundError(FileNotFoundError):
    """A shard listed in an index is missing."""


class ShardIndexError(ValueError):
    """An `_index.json` that cannot be trusted: not JSON, the wrong shape, or entries that lie."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a set: file name (relative to the index), sample count and size in bytes."""

    name: str
    samples: int
    bytes: int


@dataclass(frozen=True)
class ShardIndex:
    """The shards of a set and where the set lives."""

    base_url: str
    shards: tuple[ShardInfo, ...]
    extra: Mapping[str, object] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def url(self, shard: ShardInfo) -> str:
        return storage.join(self.base_url, shard.name)

    def to_json(self) -> str:
        body = {"version": INDEX_VERSION, "shards": [asdict(s) for s in self.shards],
                "samples": self.samples, "bytes": self.bytes, **self.extra}
        return json.dumps(body, indent=1) + "\n"

    def save(self) -> None:
        storage.write_bytes_atomic(index_url(self.base_url), self.to_json().encode())

    @classmethod
    def load(cls, url: str) -> ShardIndex:
        """Read and check the index at `url`: the `_index.json` URL itself or the shard-set folder
        holding it. ShardIndexError names the file and the entry when it cannot be trusted."""
        location = index_url(url)
        try:
            raw = storage.read_bytes(location)
        except FileNotFoundError as exc:
            raise ShardIndexNotFoundError(
                f"no shard index at {location} (build the set with `python -m jobs.shard`)") from exc
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ShardIndexError(f"{location} is not valid JSON: {exc}") from exc
        if not isinstance(body, dict) or not isinstance(body.get("shards"), list):
            raise ShardIndexError(f"{location}: expected an object with a 'shards' list")
        if body.get("version", INDEX_VERSION) != INDEX_VERSION:
            raise ShardIndexError(f"{location}: index version {body['version']!r} is not one this tool reads "
                                  f"({INDEX_VERSION})")
        shards = tuple(_shard_info(entry, i, location) for i, entry in enumerate(body.pop("shards")))
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ShardIndexError(f"{location}: shards listed more than once: {', '.join(twice[:5])}")
        for derived in ("version", "samples", "bytes"):
            body.pop(derived, None)
        return cls(storage.dirname(location), shards, body)

    def check_complete(self) -> None:
        """Raise ShardNotFoundError naming every listed shard that is missing (one listing request)."""
        try:
            present = {storage.relative(u, self.base_url) for u in storage.list_files(self.base_url)}
        except FileNotFoundError:
            present = set()
        missing = [s.name for s in self.shards if s.name not in present]
        if missing:
            raise ShardNotFoundError(f"{len(missing)} shard(s) listed in {index_url(self.base_url)} are "
                                     f"missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _shard_info(entry: object, i: int, location: str) -> ShardInfo:
    """One checked index entry: a file name inside the set's folder and non-negative counts."""
    where = f"{location}: shard entry {i}"
    if not isinstance(entry, dict):
        raise ShardIndexError(f"{where} is not an object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ShardIndexError(f"{where} has no file name")
    try:
        if member_key(name) != name:
            raise UnsafeKeyError("characters that are not allowed in a shard name")
    except UnsafeKeyError as exc:
        raise ShardIndexError(f"{where}: name {name!r} does not stay in the set's folder ({exc})") from exc
    counts = []
    for field_name in ("samples", "bytes"):
        value = entry.get(field_name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ShardIndexError(f"{where} ({name}): {field_name} must be a non-negative integer, "
                                  f"got {value!r}")
        counts.append(value)
    if counts[0] * TAR_BLOCK > counts[1]:
        raise ShardIndexError(f"{where} ({name}): {counts[0]} samples cannot fit in {counts[1]} bytes "
                              f"(each takes at least {TAR_BLOCK})")
    return ShardInfo(name, *counts)


def index_url(url: str) -> str:
    """The `_index.json` URL for a shard-set folder URL or an index URL."""
    return url if url.endswith(".json") else storage.join(url, INDEX_NAME)


def tar_member_size(n: int) -> int:
    """Bytes a member of `n` bytes takes in a tar file (header plus padded data)."""
    return TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK


class TarWriter:
    """A WebDataset tar written member by member, to a file path or a binary stream: every member gets
    fixed metadata (no owner, time 0, the given permission bits), so the same members always give the
    same bytes; PAX headers only where a name needs them (long or non-ASCII)."""

    def __init__(self, target: str | IO[bytes], permissions: int) -> None:
        self.permissions = permissions
        path, stream = (target, None) if isinstance(target, str) else (None, target)
        # Open until close(): a shard takes samples over many ShardWriter.write calls.
        self._tar = tarfile.open(path, "w", stream, format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), self.permissions
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tar.close()

    def __enter__(self) -> TarWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SHARD_MEMBER_MODE = 0o444  # a shard set's members are read-only (inference output shards': 0o644)
SPOOL_DIR = "cut-pipeline-spool"


def spool_folder() -> str:
    """Where shards are assembled before upload: one folder under the temporary directory, whose files
    name their writer's pid, so a killed writer's leftovers are found and removed by the next one."""
    folder = os.path.join(tempfile.gettempdir(), SPOOL_DIR)
    os.makedirs(folder, exist_ok=True)
    return folder


def remove_stale_spools(folder: str) -> list[str]:
    """Delete spool files of writers (on this host) that no longer run; returns their paths."""
    removed = []
    for name in os.listdir(folder):
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or storage.process_running(int(pid)):
            continue
        path = os.path.join(folder, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


class ShardWriter:
    """Write samples into `<name_prefix>%06d.tar` shards under `out_url`, each closed and uploaded
    atomically when the next sample would exceed `max_count` samples or `max_size` bytes.

    `name_prefix` is `<prefix>-` for a new set and `<prefix>-r<revision>-` for a rebuild, so a rebuild
    never overwrites the shards the current index names."""

    def __init__(self, out_url: str, name_prefix: str, max_count: int, max_size: int) -> None:
        if max_count < 1 or max_size < 1:
            raise ValueError("max_count and max_size must be positive")
        self.out_url, self.name_prefix = out_url, name_prefix
        self.max_count, self.max_size = max_count, max_size
        self.written: list[ShardInfo] = []
        self._tar: TarWriter | None = None
        self._spool = ""
        self._count = self._size = 0
        self._folder = spool_folder()
        for path in remove_stale_spools(self._folder):
            logging.getLogger(__name__).info("removed the spool of an interrupted writer: %s", path)

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample: `members` maps extensions (`jpg`, `json`) to bytes, stored as `<key>.<ext>`."""
        size = sum(tar_member_size(len(data)) for data in members.values())
        if self._tar is not None and (self._count + 1 > self.max_count or self._size + size > self.max_size):
            self._finish()
        if self._tar is None:
            # Named before it exists, so an interrupt (Ctrl-C) at any point leaves abort() knowing the file.
            self._spool = os.path.join(self._folder, f"{os.getpid()}-{uuid.uuid4().hex[:12]}.tar")
            self._tar = TarWriter(self._spool, SHARD_MEMBER_MODE)  # open across write() calls until _finish
        for ext, data in members.items():
            self._tar.add(f"{key}.{ext}", data)
        self._count += 1
        self._size += size

    def _finish(self) -> None:
        assert self._tar is not None
        tar, spool, count = self._tar, self._spool, self._count
        try:
            tar.close()
            name = f"{self.name_prefix}{len(self.written):06d}.tar"
            storage.upload_atomic(spool, storage.join(self.out_url, name))
            self.written.append(ShardInfo(name, count, os.path.getsize(spool)))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool)
            # Forgotten only once gone: an interrupt before this leaves abort() to remove the spool.
            self._tar, self._spool, self._count, self._size = None, "", 0, 0

    def close(self) -> list[ShardInfo]:
        """Finish the last shard; returns every shard written."""
        if self._tar is not None:
            self._finish()
        return self.written

    def abort(self) -> None:
        """Drop the shard being written (already uploaded shards stay)."""
        tar, spool = self._tar, self._spool
        self._tar, self._spool = None, ""
        if tar is not None:
            with contextlib.suppress(Exception):
                tar.close()
        if spool:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spool)


def iter_shard(url: str, size: int | None = None) -> Iterator[dict[str, object]]:
    """Samples of one shard in order: dicts of `__key__`, `__url__` and one bytes value per extension.

    `size`: the shard's bytes from the index, if known (saves a request on object stores).
    """
    try:
        stream = storage.open_read(url, size)
    except FileNotFoundError as exc:
        raise ShardNotFoundError(f"shard {url} is missing") from exc
    with stream:
        yield from group_members(url, tar_members(stream))


def tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream, in order; holds one member at a time."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if info.isreg():
                member = tar.extractfile(info)
                assert member is not None
                yield info.name, member.read()
            tar.members = []  # a streamed tar would otherwise keep every header


_MEMBER_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_META = re.compile(r"__[^/]*__($|/)")


def split_member_name(name: str) -> tuple[str, str]:
    """(key, lower-case extension) by the WebDataset rule: the key ends at the first dot of the last
    path segment. A name without such a dot is all key, with extension ""."""
    match = _MEMBER_NAME.match(name)
    return (match.group(1), match.group(2).lower()) if match else (name, "")


def group_members(url: str, members: Iterable[tuple[str, bytes]]) -> Iterator[dict[str, object]]:
    """Consecutive members that share a key form a sample, as WebDataset groups them; `__x__`
    metadata members are skipped. Unlike WebDataset, nothing is dropped or fatal: a member without an
    extension is a sample with no data (readers report it), and a repeated extension starts a new
    sample with the same key (key allocation renames it)."""
    current: dict[str, object] | None = None
    for name, data in members:
        if _META.match(name):
            continue
        key, ext = split_member_name(name)
        if current is None or key != current["__key__"] or ext in current:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext:
            current[ext] = data
    if current is not None:
        yield current
