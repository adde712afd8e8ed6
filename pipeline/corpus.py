"""A corpus to translate, cut into work units, and read back unit by unit.

Each input (a shard set, a listing: prefix, glob, `.txt` or `.parquet` of URLs, or a table: a
Parquet dataset or Delta table of encoded images, `pipeline.tables`) is listed once. A listing is cut
into chunks of `unit_size` images in listing order; a shard into ranges of `unit_size` samples, so one
big shard feeds many workers; a table's part file into row ranges of whole row groups (a row group
larger than `unit_size` into ranges of it), planned from footers. Units are numbered 0..n-1 in input
order.

Keys (the names of the outputs) are unique over the whole corpus (`pipeline.keys`): listing keys
come from the path below the input and are allocated in order over every listing input; a shard's
samples are keyed `<namespace>/<member key>`, with one namespace per shard (its file name), and
their member keys are checked and allocated in shard order when the shard is read (an index knows
counts, not names). A table's rows are keyed likewise, one namespace per part file
(`pipeline.tables`). Whatever cannot be read becomes an item with an error code, never a gap.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import formats, storage
from pipeline.ingest import expand_source, link_root, outside_detail
from pipeline.keys import KeyAllocator, UnsafeKeyError, check_length, member_key, shard_namespace
from pipeline.sample import EncodedSample
from pipeline.shards import (
    INDEX_NAME,
    ShardIndex,
    ShardInfo,
    iter_shard,
)
from pipeline.tables import (
    TableInput,
    TableOptions,
    TablePart,
    TableSpec,
    is_table_file,
    is_table_listing,
    open_table,
    row_ranges,
    table_samples,
)

log = logging.getLogger(__name__)

LISTING, SHARDS, TABLE = "listing", "shards", "table"
# A listing unit's items in a plan: one row group per unit (see pipeline.plan).
ITEMS_SCHEMA = pa.schema([("url", pa.string()), ("key", pa.string()), ("error", pa.string()),
                          ("error_detail", pa.string())])


@dataclass(frozen=True, slots=True)
class Item:
    """One planned input of a listing: its URL, its output key, and an error known before reading."""

    url: str
    key: str
    error: str = ""
    error_detail: str = ""


@dataclass(frozen=True, slots=True)
class WorkUnit:
    """One commit unit: samples [start, stop) of a shard, items [start, stop) of a listing, or rows
    [start, stop) of a table's part file (`shard_url`, `shard_bytes`; `part`, `table`: its rows and
    partition values, and the columns to read; `row_groups`: the part's row groups [first, last + 1)
    that hold them).

    A listing unit's items travel with it (`items`) or are read from a plan (`items_url`, `row_group`).
    """

    index: int
    input_index: int
    kind: str
    start: int
    stop: int
    shard_url: str = ""
    shard_bytes: int | None = None
    namespace: str = ""
    last_of_shard: bool = False
    items: tuple[Item, ...] | None = None
    items_url: str = ""
    row_group: int = 0
    input_url: str = ""  # a listing unit's input as given: links out of its folder are refused when read
    table: TableSpec | None = None
    part: TablePart | None = None
    row_groups: tuple[int, int] = (0, 0)

    @property
    def expected(self) -> int:
        return self.stop - self.start

    @property
    def source(self) -> str:
        if self.kind == SHARDS:
            return f"{self.shard_url} samples {self.start}..{self.stop - 1}"
        if self.kind == TABLE:
            return f"{self.shard_url} rows {self.start}..{self.stop - 1}"
        return f"items {self.start}..{self.stop - 1} of input {self.input_index}"


@dataclass
class InputListing:
    """What one input names, listed once: the image URLs of a listing, the shards of a set, or the
    part files of a table."""

    url: str
    kind: str
    urls: list[str] = field(default_factory=list)
    natural_keys: list[str] = field(default_factory=list)
    base_url: str = ""
    shards: tuple[ShardInfo, ...] = ()
    skipped: list[str] = field(default_factory=list)
    excluded: int = 0
    duplicates: int = 0
    outside: dict[str, str] = field(default_factory=dict)  # URL -> why: a symlink leaving the input
    table: TableInput | None = None

    @property
    def count(self) -> int:
        if self.table is not None:
            return self.table.rows
        return len(self.urls) if self.kind == LISTING else sum(s.samples for s in self.shards)

    def entries(self) -> list[str]:
        """What identifies this listing: its URLs, its shards' names, counts and sizes, or its table's
        version and parts' names, sizes and row counts."""
        if self.kind == LISTING:
            return self.urls
        if self.table is not None:
            return self.table.entries()
        return [f"{s.name}\t{s.samples}\t{s.bytes}" for s in self.shards]

    def digest(self) -> str:
        return digest(self.entries())


def digest(entries: Sequence[str]) -> str:
    h = hashlib.sha256()
    for entry in entries:
        h.update(entry.encode())
        h.update(b"\n")
    return h.hexdigest()


def is_shard_set(url: str) -> bool:
    return url.endswith(INDEX_NAME) or storage.exists(storage.join(url, INDEX_NAME))


def list_input(url: str, exclude: Callable[[str], bool] | None = None,
               tables: TableOptions | None = None) -> InputListing:
    """List one input; URLs for which `exclude` holds (an output prefix) are left out and counted.

    A table (a Delta table; a `.parquet` file with an image column; a folder, prefix or glob of
    `.parquet` files and no images) is opened from its metadata with `tables`' column options; a
    `.parquet` file without an image column stays a list of URLs."""
    if is_shard_set(url):
        index = ShardIndex.load(url)
        return InputListing(url, SHARDS, base_url=index.base_url, shards=checked_shards(index))
    options = tables or TableOptions()
    if is_table_file(url, options):
        return _table_listing(url, options, exclude)
    found = expand_source(url)
    files = [s.url for s in found.sources] + found.skipped
    if is_table_listing(url, [f for f in files if exclude is None or not exclude(f)]):
        return _table_listing(url, options, exclude)
    listing = InputListing(url, LISTING, skipped=found.skipped)
    for source in found.sources:
        if exclude is not None and exclude(source.url):
            listing.excluded += 1
            continue
        listing.urls.append(source.url)
        listing.natural_keys.append(source.key)
        if source.outside:
            listing.outside[source.url] = source.outside
    if not listing.urls:
        notes = [f"{len(listing.skipped)} files skipped, their names are not images"] * bool(listing.skipped)
        notes += [f"{listing.excluded} under the output prefix left out"] * bool(listing.excluded)
        raise FileNotFoundError(f"no images found at {url}" + (f" ({'; '.join(notes)})" if notes else ""))
    return listing


def _table_listing(url: str, options: TableOptions, exclude: Callable[[str], bool] | None) -> InputListing:
    table = open_table(url, options.image_column, options.key_column, options.keep_columns, options.version,
                       exclude=exclude)
    if not table.parts:
        raise FileNotFoundError(f"no rows in the table at {url} ({table.empty_parts} empty part files)")
    return InputListing(url, TABLE, base_url=url, table=table)


def checked_shards(index: ShardIndex) -> tuple[ShardInfo, ...]:
    """The index's shards against what is stored (one listing): a shard stored at another size is
    read at its stored size and a missing one kept, so the samples they lack become error rows."""
    try:
        sizes = storage.list_sizes(index.base_url)
    except FileNotFoundError:
        sizes = {}
    checked, missing = [], []
    for shard in index.shards:
        stored = sizes.get(shard.name)
        if stored is None:
            missing.append(shard.name)
        elif stored != shard.bytes:
            log.warning("%s: %s holds %d bytes, its index says %d", index.base_url, shard.name, stored,
                        shard.bytes)
        checked.append(ShardInfo(shard.name, shard.samples, shard.bytes if stored is None else stored))
    if missing:
        log.error("%s: %d listed shards are missing (their samples become shard-error rows): %s",
                  index.base_url, len(missing), ", ".join(missing[:5]))
    return tuple(checked)


@dataclass
class UnitLayout:
    """Units cut from listings, with the allocated key (and a known error) of every listing item."""

    units: list[WorkUnit]
    keys: dict[int, list[str]]
    errors: dict[int, dict[int, tuple[str, str]]]


def lay_out_units(listings: Sequence[tuple[int, InputListing]], unit_size: int, keys: KeyAllocator,
                  namespaces: KeyAllocator, first_unit: int = 0) -> UnitLayout:
    """Units for `(input_index, listing)` pairs, numbered from `first_unit`.

    `keys` and `namespaces` hold what earlier units took, so an extended plan stays unique.
    """
    layout = UnitLayout([], {}, {})
    for input_index, listing in listings:
        if listing.kind == TABLE:
            assert listing.table is not None
            layout.units += _table_units(listing.table, input_index, namespaces,
                                         first_unit + len(layout.units), unit_size)
            continue
        if listing.kind == SHARDS:
            for shard in listing.shards:
                namespace = namespaces.take(shard_namespace(shard.name))
                url = storage.join(listing.base_url, shard.name)
                for start in range(0, shard.samples, unit_size):
                    stop = min(start + unit_size, shard.samples)
                    layout.units.append(WorkUnit(
                        first_unit + len(layout.units), input_index, SHARDS, start, stop, url, shard.bytes,
                        namespace, last_of_shard=stop == shard.samples))
            continue
        allocated, errors = _listing_keys(listing, keys)
        layout.keys[input_index], layout.errors[input_index] = allocated, errors
        for start in range(0, len(listing.urls), unit_size):
            stop = min(start + unit_size, len(listing.urls))
            layout.units.append(WorkUnit(first_unit + len(layout.units), input_index, LISTING, start, stop,
                                         input_url=listing.url))
    return layout


def _table_units(table: TableInput, input_index: int, namespaces: KeyAllocator, first_unit: int,
                 unit_size: int) -> list[WorkUnit]:
    """A table's units: row ranges of whole row groups of one part file each (`tables.row_ranges`)."""
    units: list[WorkUnit] = []
    for part in table.parts:
        namespace = namespaces.take(part.namespace)
        for start, stop in row_ranges(part, unit_size):
            units.append(WorkUnit(
                first_unit + len(units), input_index, TABLE, start, stop, part.url, part.size, namespace,
                last_of_shard=stop == part.rows, input_url=table.url, table=table.spec, part=part,
                row_groups=part.groups_of(start, stop)))
    return units


def _listing_keys(listing: InputListing, keys: KeyAllocator) -> tuple[list[str], dict[int, tuple[str, str]]]:
    allocated, errors = [], {}
    for i, (url, natural) in enumerate(zip(listing.urls, listing.natural_keys, strict=True)):
        try:
            check_length(natural)
        except UnsafeKeyError as exc:
            errors[i] = ("unsafe-key", f"key of {url}: {exc}")
            natural = f"unsafe-key-{i:06d}"
        allocated.append(keys.take(natural))
        if formats.extension(url) in formats.UNSUPPORTED:
            errors[i] = ("unsupported-format", formats.unsupported_detail(url))
        if url in listing.outside:  # planned as an error row: never read
            errors[i] = ("outside-input", listing.outside[url])
    return allocated, errors


def unit_items(unit: WorkUnit, listing: InputListing, layout: UnitLayout) -> tuple[Item, ...]:
    keys, errors = layout.keys[unit.input_index], layout.errors[unit.input_index]
    return tuple(Item(listing.urls[i], keys[i], *errors.get(i, ("", "")))
                 for i in range(unit.start, unit.stop))


def plan_units(inputs: Sequence[str], unit_size: int) -> list[WorkUnit]:
    """Every unit of the corpus, held in memory with its items (for readers that need no plan)."""
    listings = [(i, list_input(url)) for i, url in enumerate(inputs)]
    layout = lay_out_units(listings, unit_size, KeyAllocator(), KeyAllocator())
    by_input = dict(listings)
    return [u if u.kind != LISTING else _with_items(u, unit_items(u, by_input[u.input_index], layout))
            for u in layout.units]


def _with_items(unit: WorkUnit, items: tuple[Item, ...]) -> WorkUnit:
    return WorkUnit(unit.index, unit.input_index, unit.kind, unit.start, unit.stop, items=items,
                    input_url=unit.input_url)


def read_items(unit: WorkUnit) -> tuple[Item, ...]:
    """A listing unit's items, from the unit or from its row group of the plan."""
    if unit.items is not None:
        return unit.items
    with storage.open_read(unit.items_url) as f:
        table = pq.ParquetFile(f).read_row_group(unit.row_group)
    return tuple(Item(u, k, e or "", d or "") for u, k, e, d in zip(
        *(table.column(n).to_pylist() for n in ITEMS_SCHEMA.names), strict=True))


def read_unit(unit: WorkUnit) -> Iterator[EncodedSample]:
    """The unit's inputs in order. Nothing is lost: what cannot be read becomes an item with an error."""
    if unit.kind == SHARDS:
        yield from _read_shard_range(unit)
        return
    if unit.kind == TABLE:
        assert unit.table is not None and unit.part is not None
        yield from table_samples(unit.table, unit.part, unit.start, unit.stop, unit.namespace)
        return
    # Checked again when read: a planned file may have become a symlink out of the input since.
    root = link_root(unit.input_url) if unit.input_url else ""
    leaves = storage.link_leaving(root) if root else None
    for item in read_items(unit):
        error, detail = item.error, item.error_detail
        target = "" if error or leaves is None else leaves(item.url)
        if target:
            error, detail = "outside-input", outside_detail(target, root)
        if error:
            yield EncodedSample(item.key, item.url, None, error, detail)
            continue
        try:
            data = storage.read_bytes(item.url)
        except storage.StorageUnreachableError:
            raise  # the store is down, not this input: no row, the unit stays uncommitted for a rerun
        except Exception as exc:  # this object could not be read after retries: its row says so
            yield EncodedSample(item.key, item.url, None, "read-error", f"{type(exc).__name__}: {exc}")
            continue
        yield EncodedSample(item.key, item.url, data)


def image_member(sample: dict[str, object]) -> tuple[str, bytes] | tuple[str, str]:
    """(extension, bytes) of a sample's first decodable member, else (error code, detail)."""
    names = [k for k in sample if not k.startswith("__")]
    for ext in names:
        if ext.rsplit(".", 1)[-1] in formats.DECODED and isinstance(sample[ext], bytes):
            return ext, sample[ext]  # type: ignore[return-value]
    unsupported = [ext for ext in names if ext.rsplit(".", 1)[-1] in formats.UNSUPPORTED]
    if unsupported:
        return "unsupported-format", formats.unsupported_detail(f"x.{unsupported[0]}")
    return "no-image", f"the sample has no image member (members: {', '.join(names) or 'none'})"


def _read_shard_range(unit: WorkUnit) -> Iterator[EncodedSample]:
    """Samples [start, stop) of a shard. Samples before `start` are read for their keys only, so every
    unit of a shard allocates keys exactly as one pass over the whole shard would.

    A shard that is missing or breaks off yields `shard-error` items for the samples its index
    promised; a shard that holds more samples than its index lists yields `shard-error` items for
    the extra ones (in the shard's last unit), so the manifest still has a row for each.
    """
    keys = KeyAllocator()
    delivered, failure = 0, ""
    try:
        for position, sample in enumerate(iter_shard(unit.shard_url, unit.shard_bytes)):
            if position >= unit.stop and not unit.last_of_shard:
                break
            delivered = position + 1
            raw = str(sample["__key__"])
            try:
                key, error, detail = keys.take(member_key(raw)), "", ""
            except UnsafeKeyError as exc:
                key = keys.take(f"unsafe-key-{position:06d}")
                error, detail = "unsafe-key", f"member key {raw!r} of sample {position}: {exc}"
            if position < unit.start:
                continue
            yield _shard_item(unit, position, raw, key, sample, error, detail)
    except storage.StorageUnreachableError:
        raise  # the store is down, not this shard: its samples get no rows until a rerun reads them
    except Exception as exc:
        storage.raise_if_unreachable(exc, unit.shard_url)  # a stream's connection failed, outside retry
        failure = f"{type(exc).__name__}: {exc}"
        log.error("input shard %s unreadable after %d samples: %s", unit.shard_url, delivered, failure)
    for position in range(max(delivered, unit.start), unit.stop):
        reason = failure or "the shard holds fewer samples than its index lists"
        key = keys.take(f"missing-{position:06d}")
        url = f"{unit.shard_url}#{position}"
        yield EncodedSample(f"{unit.namespace}/{key}", url, None, "shard-error", reason)


def _shard_item(unit: WorkUnit, position: int, raw: str, key: str, sample: dict[str, object], error: str,
                detail: str) -> EncodedSample:
    full_key = f"{unit.namespace}/{key}"
    if error:
        return EncodedSample(full_key, f"{unit.shard_url}#{position}", None, error, detail)
    if position >= unit.stop:
        return EncodedSample(full_key, f"{unit.shard_url}#{raw}", None, "shard-error",
                          f"sample {position} is beyond the {unit.stop} samples the index lists")
    found = image_member(sample)
    if isinstance(found[1], str):
        return EncodedSample(full_key, f"{unit.shard_url}#{raw}", None, found[0], found[1])
    return EncodedSample(full_key, f"{unit.shard_url}#{raw}.{found[0]}", found[1])
