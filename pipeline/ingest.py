"""Turn image sources (folders, prefixes, globs, URL lists, and tables: Parquet datasets and Delta
tables, `pipeline.table_ingest`) into a checked shard set.

Every image is read and decoded at ingest; rejects never enter a shard and are listed with their
reason in `_rejects.jsonl` (a table row's with its part file and row). The index is written last, so
a set with an index is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline import formats, storage
from pipeline.keys import KeyAllocator, UnsafeKeyError, check_length, path_key
from pipeline.pixels import DEFAULT_MAX_PIXELS, decode_failure, inspect_image
from pipeline.prefetch import ordered_map
from pipeline.shards import INDEX_NAME, REJECTS_NAME, ShardIndex, ShardWriter, index_url
from pipeline.table_ingest import TableCell, TableRows, open_rows
from pipeline.tables import TableOptions, is_table_file, is_table_listing

LIST_EXTENSIONS = (".txt", ".parquet")

log = logging.getLogger(__name__)


class KeyCollisionError(ValueError):
    """Two sources map to the same sample key."""


class ListingError(ValueError):
    """A `.txt` or `.parquet` list of URLs that cannot be read as one."""


class OutputOverlapError(ValueError):
    """A SOURCE at or under --out: the set's own files would be read back, and a rebuild removes them."""


class OutputExistsError(FileExistsError):
    """The output already holds a shard set and overwriting was not asked for."""


@dataclass(frozen=True, slots=True)
class Source:
    """One image to ingest and the sample key it gets; `outside`: where a symlink that leaves the
    listed folder leads (such a source is refused, never read), else empty."""

    url: str
    key: str
    outside: str = ""


@dataclass
class SourceListing:
    """What one SOURCE names: its images, and the files skipped because their names are not images."""

    sources: list[Source] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reject:
    """A source kept out of the shards, and why; a table row's also names its part file and row."""

    source_url: str
    reason: str
    detail: str
    file: str = ""
    row: int | None = None

    def to_json(self) -> str:
        record: dict[str, object] = {"source_url": self.source_url, "reason": self.reason,
                                     "detail": self.detail}
        if self.file:
            record |= {"file": self.file, "row": self.row}
        return json.dumps(record)


@dataclass(frozen=True)
class Summary:
    """What an ingest produced."""

    out_url: str
    shards: int
    samples: int
    bytes: int
    rejects: int
    seconds: float


def _url_list(url: str) -> list[str]:
    data = storage.read_bytes(url)
    try:
        if url.endswith(".parquet"):
            table = pq.read_table(io.BytesIO(data))
            column = "url" if "url" in table.column_names else table.column_names[0]
            return [str(u) for u in table.column(column).to_pylist() if u]
        lines = data.decode().splitlines()
    except (ValueError, IndexError, pa.ArrowException) as exc:  # not UTF-8, not Parquet, no column
        raise ListingError(f"{url} is not a usable list of URLs ({type(exc).__name__}: {exc})") from exc
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def glob_root(pattern: str) -> str:
    """The folder part of a glob before its first wildcard."""
    first = min(i for i, c in enumerate(pattern) if c in "*?[")
    return storage.dirname(pattern[:first] + "x")


def expand_source(spec: str) -> SourceListing:
    """The images one SOURCE argument names.

    A folder or prefix: its files with an image extension (`pipeline.formats`), recursively, keyed
    by path below it; other files are listed as skipped. A glob: every matching file, keyed by path
    below the glob's fixed part. A `.txt` (one URL a line) or `.parquet` (column `url`) list: those
    URLs, keyed by their path. Anything else: that single file, keyed by its name.

    Symlinks in a folder or glob are never followed out of it: one whose target lies outside is
    listed with `Source.outside` set (a reject, an error row); one to a folder inside is not descended
    (its files are listed under their own paths). Lists and single files are read as named.
    """
    if storage.has_glob(spec):
        return _folder_listing(spec, glob_root(spec), lambda url: True)
    if storage.is_dir(spec):
        return _folder_listing(spec, spec, formats.is_image_name)
    if spec.endswith(LIST_EXTENSIONS):
        return SourceListing([Source(u, path_key(storage.url_path(u))) for u in _url_list(spec)])
    return SourceListing([Source(u, path_key(posixpath.basename(storage.url_path(u))))
                          for u in storage.list_files(spec)])


def link_root(spec: str) -> str:
    """The local folder a folder or glob SOURCE lists below, out of which links are not followed;
    "" for object stores (no links), lists and single files (read as named)."""
    if not storage.is_local(spec):
        return ""
    if storage.has_glob(spec):
        return glob_root(spec)
    return spec if storage.is_dir(spec) else ""


def outside_detail(target: str, root: str) -> str:
    return f"a symlink to {target}, outside the input {root} (link targets are not followed out)"


def _folder_listing(spec: str, root: str, is_image: Callable[[str], bool]) -> SourceListing:
    below, leaves = storage.relative_to(root), storage.link_leaving(root)
    listing, folder_links = SourceListing(), []
    for url in storage.list_files(spec):
        target = leaves(url)
        if target:
            listing.sources.append(Source(url, path_key(below(url)), outside_detail(target, root)))
        elif storage.is_folder_link(url):
            folder_links.append(url)
        elif is_image(url):
            listing.sources.append(Source(url, path_key(below(url))))
        else:
            listing.skipped.append(url)
    outside = sum(bool(s.outside) for s in listing.sources)
    if outside:
        examples = [s.url for s in listing.sources if s.outside][:3]
        log.warning("%s: %d symlinks lead outside it and are refused as outside-input (e.g. %s)", spec,
                    outside, ", ".join(examples))
    if folder_links:
        log.warning("%s: %d symlinks to folders inside it are not descended; their files are listed under "
                    "their own paths (e.g. %s)", spec, len(folder_links), ", ".join(folder_links[:3]))
    return listing


def list_sources(specs: Iterable[str]) -> list[Source]:
    """All sources of the SOURCE arguments in order; a key shared by two sources is an error."""
    return collect_sources([(spec, expand_source(spec)) for spec in specs])


def collect_sources(listings: Iterable[tuple[str, SourceListing]]) -> list[Source]:
    """The sources of listed SOURCE arguments in order; a key shared by two sources is an error."""
    seen: dict[str, str] = {}
    sources, collisions = [], []
    for spec, listing in listings:
        if listing.skipped:
            log.warning("%s: skipped %d files whose names are not images (e.g. %s)", spec,
                        len(listing.skipped), ", ".join(listing.skipped[:3]))
        for source in listing.sources:
            if source.key in seen:
                collisions.append(f"{seen[source.key]} and {source.url} -> {source.key!r}")
                continue
            seen[source.key] = source.url
            sources.append(source)
    if collisions:
        more = f"\n  ... and {len(collisions) - 50} more" if len(collisions) > 50 else ""
        shown = "\n  ".join(collisions[:50]) + more
        raise KeyCollisionError(f"{len(collisions)} sample key collision(s): two sources map to one key "
                                f"(rename them or shard them separately):\n  {shown}")
    return sources


Pending = Source | TableCell  # one image on its way into a shard


def _load(item: Pending, domain: str | None, max_pixels: int) -> tuple[Pending, dict[str, bytes] | Reject]:
    if isinstance(item, TableCell):
        if item.data is None:
            return item, Reject(item.url, item.error, item.detail, item.file, item.row)
        return item, _checked(item, item.data, domain, max_pixels)
    if item.outside:
        return item, Reject(item.url, "outside-input", item.outside)
    if formats.extension(item.url) in formats.UNSUPPORTED:
        return item, Reject(item.url, "unsupported-format", formats.unsupported_detail(item.url))
    try:
        data = storage.read_bytes(item.url)
    except OSError as exc:
        return item, Reject(item.url, "unreadable", f"{type(exc).__name__}: {exc}")
    return item, _checked(item, data, domain, max_pixels)


def _checked(item: Pending, data: bytes, domain: str | None, max_pixels: int) -> dict[str, bytes] | Reject:
    """The sample's members when `data` decodes as an image within bounds, else its reject."""
    where = (item.file, item.row) if isinstance(item, TableCell) else ("", None)
    try:
        info = inspect_image(data, max_pixels=max_pixels)
    except Exception as exc:  # whatever one image makes a decoder raise: its reject, not the run's end
        failure = decode_failure(exc)
        return Reject(item.url, failure.reason, str(failure), *where)
    meta = {"key": item.key, "source_url": item.url, "width": info.width, "height": info.height,
            "format": info.format, "domain": domain, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}
    ext = formats.MEMBER_EXTENSIONS[info.format]
    return {ext: data, "json": json.dumps(meta, sort_keys=True).encode()}


@dataclass(frozen=True)
class ExistingSet:
    """What an output folder already holds: its index (if any) and its top-level shard-set files."""

    index: ShardIndex | None
    files: dict[str, str]  # name -> URL: shards, the index, rejects, temporary files of killed writes

    @property
    def revision(self) -> int:
        return int(self.index.extra.get("revision", 1)) if self.index is not None else 1


def existing_set(out_url: str) -> ExistingSet:
    try:
        names = {storage.relative(u, out_url): u for u in storage.list_files(out_url)}
    except FileNotFoundError:
        return ExistingSet(None, {})
    files = {name: u for name, u in names.items() if "/" not in name and (
        name.endswith(".tar") or name in (INDEX_NAME, REJECTS_NAME) or name.startswith(".tmp-"))}
    index = ShardIndex.load(out_url) if INDEX_NAME in files else None
    return ExistingSet(index, files)


def check_output(existing: ExistingSet, out_url: str, overwrite: bool) -> None:
    """Refuse an output that already holds a set (or the leftovers of one) unless overwriting."""
    if overwrite or not existing.files:
        return
    shards = sum(name.endswith(".tar") for name in existing.files)
    if existing.index is None:
        raise OutputExistsError(
            f"{out_url} holds {shards} shard file(s) but no {INDEX_NAME}: a build that was interrupted, so "
            f"the set is incomplete. Rerun with --overwrite to build it again; the leftovers are removed "
            f"once the new index is written")
    raise OutputExistsError(
        f"{out_url} already holds a shard set ({len(existing.index.shards)} shards); pass --overwrite to "
        f"replace it (readers keep the old set until the new index is written)")


def remove_unlisted(existing: ExistingSet, index: ShardIndex) -> list[str]:
    """After the switch to `index`: delete the old set's shards and leftovers it does not name."""
    keep = {s.name for s in index.shards} | {INDEX_NAME, REJECTS_NAME}
    removed = [url for name, url in existing.files.items() if name not in keep]
    for url in removed:
        storage.remove(url)
    return removed


def build_shards(specs: Sequence[str], out_url: str, *, prefix: str = "shard", domain: str | None = None,
                 max_count: int = 10_000, max_size: int = 256 << 20, max_pixels: int = DEFAULT_MAX_PIXELS,
                 workers: int = 8, overwrite: bool = False, progress: bool = True,
                 tables: TableOptions | None = None) -> Summary:
    """Check and shard every image the SOURCE specs name into `out_url`; see `python -m jobs.shard`.

    A SOURCE that is a table is read with `tables`' column options: its rows follow the files' images,
    keyed by the table's keys made unique against every key before them (`~2`, `~3`, ...).
    """
    start = time.monotonic()
    inside_out = storage.within(out_url)
    for spec in specs:
        if inside_out(glob_root(spec) if storage.has_glob(spec) else spec):
            raise OutputOverlapError(f"SOURCE {spec} lies inside --out {out_url}: give the shard set a "
                                     f"folder of its own; nothing was written")
    tables, listings = split_tables(specs, tables or TableOptions())
    sources = collect_sources(listings)
    total = len(sources) + sum(t.count for t in tables)
    if not total:
        raise FileNotFoundError(f"no images found in {', '.join(specs)}")
    existing = existing_set(out_url)
    check_output(existing, out_url, overwrite)
    log.info("sharding %d images into %s (at most %d samples or %d bytes a shard)", total, out_url,
             max_count, max_size)
    # A rebuild writes beside the old set under new names; the new index switches readers over.
    revision = existing.revision + 1 if existing.files else 1
    writer = ShardWriter(out_url, f"{prefix}-" if revision == 1 else f"{prefix}-r{revision}-", max_count,
                         max_size)
    rejects: list[Reject] = []
    on_terminal = progress and sys.stderr.isatty()  # in a log file a bar is a carriage-return stream
    bar = tqdm(total=total, unit="img", desc=f"shard {prefix}", disable=not on_terminal)
    try:
        threads = max(1, workers)
        pending = _pending(sources, tables)
        loaded = ordered_map(lambda s: _load(s, domain, max_pixels), pending, threads, 4 * threads, "ingest")
        for source, result in loaded:
            if isinstance(result, Reject):
                rejects.append(result)
                bar.set_postfix(rejects=len(rejects))
            else:
                writer.write(source.key, result)
            bar.update()
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    lines = "".join(r.to_json() + "\n" for r in rejects)
    storage.write_bytes_atomic(storage.join(out_url, REJECTS_NAME), lines.encode())
    extra = {"prefix": prefix, "domain": domain, "rejects": len(rejects), "revision": revision}
    index = ShardIndex(out_url, tuple(shards), extra)
    index.save()
    removed = remove_unlisted(existing, index)
    if removed:
        log.info("removed %d files of the previous set or of interrupted builds", len(removed))
    log.info("wrote %d shards (%d samples, %d rejected) and %s", len(shards), index.samples, len(rejects),
             index_url(out_url))
    return Summary(out_url, len(shards), index.samples, index.bytes, len(rejects), time.monotonic() - start)


def split_tables(specs: Sequence[str], options: TableOptions) -> tuple[list[TableRows],
                                                                      list[tuple[str, SourceListing]]]:
    """The SOURCE specs that are tables, opened (footers read and checked, before anything is written),
    and the listings of the others; each folder, prefix or glob is listed once."""
    tables, listings = [], []
    for spec in specs:
        if is_table_file(spec, options):
            tables.append(open_rows(spec, options))
            continue
        listing = expand_source(spec)
        if is_table_listing(spec, [s.url for s in listing.sources] + listing.skipped):
            tables.append(open_rows(spec, options))
        else:
            listings.append((spec, listing))
    return tables, listings


def _pending(sources: Sequence[Source], tables: Sequence[TableRows]) -> Iterator[Pending]:
    """The files' sources, then each table's cells with unique keys (allocated here, in order, so the
    keys are a function of the inputs alone); a key too long to be safe makes its row a reject."""
    yield from sources
    keys = KeyAllocator({s.key for s in sources})
    for table in tables:
        renamed = 0
        for cell in table.cells():
            try:
                check_length(cell.key)
                key = keys.take(cell.key)
            except UnsafeKeyError as exc:
                yield TableCell(cell.key, cell.url, cell.file, cell.row, None, "unsafe-key",
                                f"key of {cell.url}: {exc}")
                continue
            renamed += key != cell.key
            yield cell if key == cell.key else TableCell(key, cell.url, cell.file, cell.row, cell.data,
                                                         cell.error, cell.detail)
        if renamed:
            log.warning("%s: %d rows share a key with an earlier row or file; they are keyed <key>~2, "
                        "<key>~3, ...", table.url, renamed)
