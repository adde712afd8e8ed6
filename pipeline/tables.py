"""Tables of images as inputs: Parquet datasets (and Delta snapshots), planned from footers alone.

A table is one `.parquet` file, a folder or prefix of part files (hive `k=v` folders give partition
columns), a glob of part files, or a Delta table (a folder with `_delta_log/`), on any fsspec URL.
`open_table` reads only the part files' footers: each part's size, row count, rows per row group and
schema. Nothing here reads an image cell until `table_samples` reads a row range.

Column rules:
- image: `--image-column`, else the one column that is binary/large_binary or the Hugging Face
  `datasets` Image struct (`bytes` binary, `path` string); none or several is a `TableError`
  listing the candidates with their types.
- key: `--key-column` (strings or integers), else the Image struct's `path` where present and not
  null, else the row's position in its part (`000123`). Keys are made safe (`pipeline.keys`), put
  under one namespace per part file (`part-0.parquet/000123`) and made unique within it in row
  order, so any row range derives the same keys as a pass over the whole part.
- kept: `--keep-columns` names columns (partition columns included) carried to the outputs.
The columns used must have one type in every part file; a part that differs is a `TableError`
naming the file and the column.
"""

from __future__ import annotations

import base64
import logging
import posixpath
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import formats, storage
from pipeline.keys import KeyAllocator, UnsafeKeyError, check_length, member_key, path_key, shard_namespace
from pipeline.manifest import SCHEMA as MANIFEST_SCHEMA
from pipeline.prefetch import ordered_map
from pipeline.sample import EncodedSample

log = logging.getLogger(__name__)

DELTA_LOG = "_delta_log"
PARQUET_SUFFIX = ".parquet"
BINARY, STRUCT = "binary", "struct"  # the two layouts of an image column
FOOTER_THREADS = 16  # footers read at once: planning waits on round trips, not on bytes


class TableError(ValueError):
    """A table that cannot be translated as asked (no or several image columns, a column of the wrong
    type, part files whose schemas differ, a part file without a readable footer): the same arguments
    fail the same way."""


@dataclass(frozen=True)
class TableOptions:
    """How to read tables: the flags --image-column, --key-column, --keep-columns, --table-version."""

    image_column: str | None = None
    key_column: str | None = None
    keep_columns: tuple[str, ...] = ()
    version: int | None = None


@dataclass(frozen=True)
class TablePart:
    """One part file, as its footer (or the Delta log) describes it."""

    url: str
    name: str  # its path below the table's root: what the job identity and keys name it by
    size: int
    rows: int
    row_groups: tuple[int, ...] = ()  # rows of each row group
    partition: tuple[tuple[str, str | None], ...] = ()  # hive folders' (or the Delta log's) values
    namespace: str = ""  # the first key segment of its rows, unique within the table

    def groups_of(self, start: int, stop: int) -> tuple[int, int]:
        """The row groups [first, last + 1) that hold rows [start, stop)."""
        first = last = 0
        begin = 0
        for g, rows in enumerate(self.row_groups):
            if begin <= start < begin + rows:
                first = g
            if begin < stop <= begin + rows:
                last = g
                break
            begin += rows
        return first, last + 1


@dataclass(frozen=True)
class TableSpec:
    """Which columns of a table are read, and how: the same for every part (checked when opened)."""

    image_column: str
    image_kind: str  # BINARY or STRUCT
    key_column: str | None = None
    key_from_path: bool = False  # the Image struct's `path` names the key where not null
    keep_columns: tuple[str, ...] = ()
    kept_schema: pa.Schema = field(default_factory=lambda: pa.schema([]))  # file and partition columns
    version: int | None = None  # the Delta version read, else None

    def file_columns(self) -> list[str]:
        """The leaf columns a reader asks a part file for: nothing more than the rows need."""
        if self.image_kind == STRUCT:
            columns = [f"{self.image_column}.bytes"] + [f"{self.image_column}.path"] * self.key_from_path
        else:
            columns = [self.image_column]
        if self.key_column is not None:
            columns.append(self.key_column)
        return columns + [c for c in self.keep_columns if c not in self.partition_columns()
                          and c not in columns]

    def partition_columns(self) -> set[str]:
        return {f.name for f in self.kept_schema if f.metadata and f.metadata.get(b"partition") == b"1"}

    def to_json(self) -> dict[str, Any]:
        """For the plan: plain JSON (the kept schema as base64 Arrow IPC)."""
        return {"image_column": self.image_column, "image_kind": self.image_kind,
                "key_column": self.key_column,
                "key_from_path": self.key_from_path, "keep_columns": list(self.keep_columns),
                "kept_schema": base64.b64encode(self.kept_schema.serialize().to_pybytes()).decode(),
                "version": self.version}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TableSpec:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["kept_schema"])))
        return cls(body["image_column"], body["image_kind"], body["key_column"], body["key_from_path"],
                   tuple(body["keep_columns"]), schema, body["version"])


@dataclass(frozen=True)
class TableInput:
    """An opened table: its part files (footers read, none empty) and the spec to read them by."""

    url: str
    parts: tuple[TablePart, ...]
    spec: TableSpec
    empty_parts: int = 0  # part files without rows: nothing to translate, left out

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def version(self) -> int | None:
        return self.spec.version

    def entries(self) -> list[str]:
        """What identifies this table for a rerun's check: its version, every part's name, size, rows."""
        head = [f"version\t{self.spec.version}"] if self.spec.version is not None else []
        return head + [f"{p.name}\t{p.size}\t{p.rows}" for p in self.parts]


class KeptColumns(dict):
    """A row's kept column values (a plain dict to its readers) that also knows their Arrow types, so
    the manifest stores them as the table typed them."""

    schema: pa.Schema

    def __init__(self, values: dict[str, Any], schema: pa.Schema) -> None:
        super().__init__(values)
        self.schema = schema


# ------------------------------------------------------------------------------------------ finding
def is_delta(url: str) -> bool:
    return not storage.has_glob(url) and storage.exists(storage.join(url.rstrip("/"), DELTA_LOG))


def is_parquet_name(url: str) -> bool:
    return url.endswith(PARQUET_SUFFIX)


def _hidden(name: str) -> bool:
    """Files Spark, Hive and pyarrow leave out of a dataset: `_SUCCESS`, `_metadata`, `.crc`, ..."""
    return any(segment.startswith(("_", ".")) for segment in name.split("/"))


def hive_partition(name: str) -> tuple[tuple[str, str | None], ...]:
    """The `k=v` folders of a part's path below the table root, as (column, value) pairs."""
    pairs = []
    for segment in name.split("/")[:-1]:
        column, sep, value = segment.partition("=")
        if sep and column:
            value = unquote(value)
            pairs.append((column, None if value == "__HIVE_DEFAULT_PARTITION__" else value))
    return tuple(pairs)


def parquet_parts(root: str, urls: Sequence[str], sizes: dict[str, int] | None = None
                  ) -> list[tuple[str, str, int | None]]:
    """(url, name below root, size if known) of the visible `.parquet` files among `urls`."""
    below = storage.relative_to(root) if root else (lambda u: posixpath.basename(storage.url_path(u)))
    found = []
    for url in urls:
        try:
            name = below(url)
        except ValueError:
            name = posixpath.basename(storage.url_path(url))
        if is_parquet_name(url) and not _hidden(name):
            found.append((url, name, (sizes or {}).get(name)))
    return found


def list_parts(url: str) -> tuple[str, list[tuple[str, str, int | None]]]:
    """The table root and the visible part files of a Parquet dataset at `url` (a file, a folder or
    prefix, a glob); FileNotFoundError if nothing is there."""
    if storage.has_glob(url):
        first = min(i for i, c in enumerate(url) if c in "*?[")
        root = storage.dirname(url[:first] + "x")
        return root, parquet_parts(root, storage.list_files(url))
    if storage.is_dir(url):
        root = url.rstrip("/")
        sizes = storage.list_sizes(root)
        urls = [storage.join(root, name) for name in sorted(sizes)] if storage.is_local(url) else \
            storage.list_files(root)
        return root, parquet_parts(root, urls, sizes)
    return storage.dirname(url), [(u, posixpath.basename(storage.url_path(u)), None)
                                  for u in storage.list_files(url)]  # a file named: read as named


# ----------------------------------------------------------------------------------------- footers
@dataclass(frozen=True)
class _Footer:
    url: str
    name: str
    size: int
    rows: int
    row_groups: tuple[int, ...]
    schema: pa.Schema


def read_footer(url: str, name: str, size: int | None = None) -> _Footer:
    """A part's size, rows, row groups and schema from its footer alone (TableError if it has none)."""
    try:
        with storage.open_read(url, size=size) as f:
            meta = pq.ParquetFile(f).metadata
            if size is None:
                size = f.seek(0, 2)
    except storage.StorageUnreachableError:
        raise
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        if storage.unreachable_endpoint(exc) is not None:
            raise
        raise TableError(f"part file {url}: no readable Parquet footer ({type(exc).__name__}: {exc}); "
                         f"nothing was written") from exc
    groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
    return _Footer(url, name, int(size), meta.num_rows, groups, meta.schema.to_arrow_schema())


def read_footers(parts: Sequence[tuple[str, str, int | None]]) -> list[_Footer]:
    """Every part's footer, several at a time (object stores answer each in one round trip or two)."""
    threads = min(FOOTER_THREADS, len(parts))
    return list(ordered_map(lambda p: read_footer(*p), parts, threads if threads > 1 else 0,
                            2 * FOOTER_THREADS, "footer"))


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _is_image_struct(t: pa.DataType) -> bool:
    if not pa.types.is_struct(t) or t.get_field_index("bytes") < 0:
        return False
    if not _is_binary(t.field("bytes").type):
        return False
    path = t.get_field_index("path")
    return path < 0 or pa.types.is_string(t.field(path).type) or pa.types.is_large_string(t.field(path).type)


def image_candidates(schema: pa.Schema) -> list[pa.Field]:
    """The columns that can hold encoded images: binary, or the `datasets` Image struct."""
    return [f for f in schema if _is_binary(f.type) or _is_image_struct(f.type)]


def _describe(fields: Sequence[pa.Field]) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in fields) or "none"


def choose_spec(first: _Footer, partition_names: Sequence[str], options: TableOptions,
                version: int | None = None) -> TableSpec:
    """The columns to read, chosen on the first part's schema (TableError naming what is wrong)."""
    schema = first.schema
    where = f"part file {first.url}"
    if options.image_column is not None:
        if options.image_column not in schema.names:
            raise TableError(f"{where} has no column {options.image_column!r} (--image-column); its "
                             f"columns: {_describe(list(schema))}")
        image = schema.field(options.image_column)
        if not (_is_binary(image.type) or _is_image_struct(image.type)):
            raise TableError(f"{where}: column {image.name!r} is {image.type}, not an image column (binary, "
                             f"or the datasets Image struct of bytes and path)")
    else:
        candidates = image_candidates(schema)
        if len(candidates) != 1:
            raise TableError(f"{where}: {'no' if not candidates else 'several'} image columns; name one "
                             f"with --image-column (binary or datasets Image struct candidates: "
                             f"{_describe(candidates)}; all columns: {_describe(list(schema))})")
        image = candidates[0]
    kind = STRUCT if _is_image_struct(image.type) else BINARY
    key = options.key_column
    if key is not None:
        if key not in schema.names:
            raise TableError(f"{where} has no column {key!r} (--key-column); its columns: "
                             f"{_describe(list(schema))}")
        t = schema.field(key).type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
            raise TableError(f"{where}: key column {key!r} is {t}, not strings or integers")
    kept_fields = []
    for name in options.keep_columns:
        if name in MANIFEST_SCHEMA.names:
            raise TableError(f"--keep-columns {name!r}: the manifest has a column of that name; rename it "
                             f"in the table or leave it out")
        if name == image.name:
            raise TableError(f"--keep-columns {name!r} is the image column")
        if name in schema.names:
            kept_fields.append(schema.field(name))
        elif name in partition_names:
            kept_fields.append(pa.field(name, pa.string(), metadata={"partition": "1"}))
        else:
            raise TableError(f"--keep-columns {name!r}: {where} has no such column (columns: "
                             f"{_describe(list(schema))}; partition columns: "
                             f"{', '.join(partition_names) or 'none'})")
    key_from_path = key is None and kind == STRUCT and image.type.get_field_index("path") >= 0
    return TableSpec(image.name, kind, key, key_from_path, tuple(options.keep_columns),
                     pa.schema(kept_fields), version)


def check_schemas(footers: Sequence[_Footer], spec: TableSpec) -> None:
    """TableError naming the first part file whose type of a used column differs from the first's."""
    first = footers[0]
    used = [spec.image_column] + ([spec.key_column] if spec.key_column else []) + [
        c for c in spec.keep_columns if c not in spec.partition_columns()]
    for footer in footers[1:]:
        for column in used:
            want = first.schema.field(column).type
            if column not in footer.schema.names:
                raise TableError(f"part file {footer.url} has no column {column!r} (part file {first.url} "
                                 f"has it, as {want}); nothing was written")
            got = footer.schema.field(column).type
            if got != want:
                raise TableError(f"part file {footer.url}: column {column!r} is {got}, while part file "
                                 f"{first.url} has {want}; nothing was written")


Partition = tuple[tuple[str, str | None], ...]


def build_table(url: str, footers: Sequence[_Footer], partitions: Sequence[Partition], options: TableOptions,
                version: int | None = None) -> TableInput:
    """A TableInput from its parts' footers (and partition values), with the spec checked on all."""
    if not footers:
        raise FileNotFoundError(f"no Parquet part files at {url}")
    names = list(dict.fromkeys(k for partition in partitions for k, _ in partition))
    spec = choose_spec(footers[0], [n for n in names if n not in footers[0].schema.names], options, version)
    check_schemas(footers, spec)
    namespaces = KeyAllocator()
    parts, empty = [], 0
    for footer, partition in zip(footers, partitions, strict=True):
        if footer.rows == 0:
            empty += 1
            continue
        namespace = namespaces.take(shard_namespace(footer.name.replace("/", "_")))
        parts.append(TablePart(footer.url, footer.name, footer.size, footer.rows, footer.row_groups,
                               partition, namespace))
    if empty:
        log.info("%s: %d part files hold no rows", url, empty)
    return TableInput(url, tuple(parts), spec, empty)


def open_parquet(url: str, options: TableOptions = TableOptions(),
                 exclude: Callable[[str], bool] | None = None) -> TableInput:
    """A Parquet dataset (file, folder or prefix, hive folders, glob) opened from its footers."""
    _, found = list_parts(url)
    if exclude is not None:
        found = [p for p in found if not exclude(p[0])]
    if not found:
        raise FileNotFoundError(f"no Parquet part files at {url}")
    footers = read_footers(found)
    return build_table(url, footers, [hive_partition(name) for _, name, _ in found], options)


def open_delta(url: str, options: TableOptions = TableOptions()) -> TableInput:
    """A Delta table's snapshot (options.version, else the current one) opened from its log and the
    footers of its data files; the spec records the version read. A version that is gone raises
    `pipeline.delta.DeltaVersionError` (a FileNotFoundError: exit 2 naming the version)."""
    try:
        from pipeline import delta

        version, files = delta.snapshot_files(url, options.version)
    except ImportError as exc:  # deltalake is an optional extra: the same run fails the same way
        raise TableError(f"{url} is a Delta table: {exc}") from exc
    below = storage.relative_to(url.rstrip("/"))
    found, partitions = [], []
    for file_url, size, values in sorted(files):
        try:
            name = below(file_url)
        except ValueError:  # a data file outside the table's folder (an absolute path in the log)
            name = storage.url_path(file_url)
        found.append((file_url, name, size))
        partitions.append(tuple(sorted((k, None if v is None else str(v)) for k, v in values.items())))
    if not found:
        raise FileNotFoundError(f"version {version} of the Delta table {url} holds no data files")
    return build_table(url, read_footers(found), partitions, options, version)


def open_table(url: str, image_column: str | None = None, key_column: str | None = None,
               keep_columns: Sequence[str] = (), version: int | None = None,
               exclude: Callable[[str], bool] | None = None) -> TableInput:
    """The table at `url` (Parquet dataset or Delta table), opened from metadata alone.

    TableError for a table that cannot be read as asked; FileNotFoundError when nothing is there."""
    options = TableOptions(image_column, key_column, tuple(keep_columns), version)
    if is_delta(url):
        return open_delta(url, options)
    if version is not None:
        raise TableError(f"--table-version {version}: {url} is not a Delta table (no {DELTA_LOG}/)")
    return open_parquet(url, options, exclude)


def parquet_is_image_table(url: str, options: TableOptions = TableOptions()) -> bool:
    """Whether one `.parquet` file is a table of images rather than a list of URLs (read as a listing,
    as before tables): it has an image column, or --image-column names one of its columns."""
    try:
        footer = read_footer(url, posixpath.basename(storage.url_path(url)))
    except TableError:  # not Parquet at all: the listing reader says why it is no list of URLs either
        return False
    return options.image_column in footer.schema.names or bool(image_candidates(footer.schema))


def looks_like_table(url: str, files: Sequence[str]) -> bool:
    """Whether a folder or glob that lists `files` is a Parquet dataset: part files, no images."""
    return bool(parquet_parts("", files)) and not any(formats.is_image_name(f) for f in files) and (
        not storage.has_glob(url) or all(is_parquet_name(f) for f in files))


# ---------------------------------------------------------------------------------------- planning
def row_ranges(part: TablePart, unit_size: int) -> list[tuple[int, int]]:
    """The part's rows cut into [start, stop) ranges of whole row groups of up to `unit_size` rows; a
    row group larger than that is cut into ranges of `unit_size` rows of its own."""
    ranges: list[tuple[int, int]] = []
    start = begin = 0  # the open range starts at `start`; the next group at `begin`
    for rows in part.row_groups:
        if begin > start and (rows > unit_size or begin - start + rows > unit_size):
            ranges.append((start, begin))
            start = begin
        if rows > unit_size:
            ranges += [(s, min(s + unit_size, begin + rows)) for s in range(begin, begin + rows, unit_size)]
            start = begin + rows
        begin += rows
    if begin > start:
        ranges.append((start, begin))
    return ranges


# ----------------------------------------------------------------------------------------- reading
def _cell_key(raw: Any, row: int, spec: TableSpec) -> tuple[str, str, str]:
    """(natural key, error code, detail) of a row from its key column or Image path value."""
    if raw is None or raw == "":
        return f"{row:06d}", "", ""
    if spec.key_column is None:  # the Image struct's path: a file name or path
        key = path_key(str(raw))
        try:
            check_length(key)
        except UnsafeKeyError as exc:
            return f"unsafe-key-{row:06d}", "unsafe-key", f"path {str(raw)[:200]!r} of row {row}: {exc}"
        return key, "", ""
    try:
        return member_key(str(raw)), "", ""
    except UnsafeKeyError as exc:
        return f"unsafe-key-{row:06d}", "unsafe-key", f"key {str(raw)[:200]!r} of row {row}: {exc}"


def _key_values(table: pa.Table, spec: TableSpec) -> list[Any] | None:
    if spec.key_column is not None:
        return table.column(spec.key_column).to_pylist()
    if spec.key_from_path:
        return pc.struct_field(table.column(spec.image_column), "path").to_pylist()
    return None


def _image_values(table: pa.Table, spec: TableSpec) -> list[bytes | None]:
    column = table.column(spec.image_column)
    if spec.image_kind == STRUCT:
        return pc.struct_field(column, "bytes").to_pylist()
    return column.to_pylist()


def table_samples(table: TableInput | TableSpec, part: TablePart, row_start: int = 0,
                  row_stop: int | None = None, namespace: str | None = None) -> Iterator[EncodedSample]:
    """Rows [row_start, row_stop) of one part file, one EncodedSample each in row order, reading only
    the row groups that hold them and only the columns the spec uses.

    Keyed `<namespace>/<key>` (the part's namespace by default). A null or empty image cell is an
    `empty` sample; a part that cannot be read (or whose footer no longer matches the plan) gives
    `read-error` samples for each of its rows not yet delivered, never fewer rows; storage that
    stays unreachable raises storage.StorageUnreachableError.
    """
    spec = table.spec if isinstance(table, TableInput) else table
    stop = part.rows if row_stop is None else row_stop
    namespace = namespace if namespace is not None else part.namespace
    keys = KeyAllocator()
    next_row, failure = row_start, ""
    try:
        with storage.open_read(part.url, size=part.size) as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            if meta.num_rows != part.rows or (part.row_groups and groups != part.row_groups):
                raise OSError(f"the part file changed since it was planned ({meta.num_rows} rows in "
                              f"{len(groups)} row groups; planned: {part.rows} in {len(part.row_groups)})")
            yield from _read_rows(parquet, groups, spec, part, row_start, stop, namespace, keys)
            return
    except storage.StorageUnreachableError:
        raise
    except _Delivered as progress:  # rows delivered before the part broke off
        next_row, failure = progress.next_row, progress.reason
    except Exception as exc:
        endpoint = storage.unreachable_endpoint(exc)
        if endpoint is not None:
            raise storage.StorageUnreachableError(f"read {part.url}: storage unreachable ({endpoint})",
                                                  endpoint) from exc
        failure = f"{type(exc).__name__}: {exc}"
    log.error("part file %s unreadable from row %d: %s", part.url, next_row, failure)
    kept = _partition_only(spec, part)
    for row in range(next_row, stop):
        key = keys.take(f"unreadable-{row:06d}")
        yield EncodedSample(f"{namespace}/{key}", f"{part.url}#{row}", None, "read-error", failure, kept)


class _Delivered(Exception):
    def __init__(self, next_row: int, reason: str) -> None:
        super().__init__(reason)
        self.next_row, self.reason = next_row, reason


def _partition_only(spec: TableSpec, part: TablePart) -> KeptColumns | None:
    """The kept columns of a row that could not be read: partition values, file columns null."""
    if not spec.keep_columns:
        return None
    values = dict(part.partition)
    return KeptColumns({c: values.get(c) for c in spec.keep_columns}, spec.kept_schema)


def _read_rows(parquet: pq.ParquetFile, groups: tuple[int, ...], spec: TableSpec, part: TablePart, start: int,
               stop: int, namespace: str, keys: KeyAllocator) -> Iterator[EncodedSample]:
    """The rows, row group by row group: groups before `start` are read for their keys only."""
    keyed = spec.key_column is not None or spec.key_from_path
    key_columns = ([spec.key_column] if spec.key_column else [f"{spec.image_column}.path"]) if keyed else []
    partition = dict(part.partition)
    begin = 0
    row = start
    for g, rows in enumerate(groups):
        if begin >= stop:
            break
        end = begin + rows
        if end <= start:
            if keyed:  # keys of earlier rows, so this range allocates as one pass over the part would
                table = parquet.read_row_group(g, columns=key_columns, use_threads=False)
                for i, raw in enumerate(_key_values(table, spec) or ()):
                    keys.take(_cell_key(raw, begin + i, spec)[0])
            begin = end
            continue
        try:
            table = parquet.read_row_group(g, columns=spec.file_columns(), use_threads=False)
            images = _image_values(table, spec)
            raw_keys = _key_values(table, spec)
            kept = {c: (table.column(c).to_pylist() if c in table.column_names else [partition.get(c)] * rows)
                    for c in spec.keep_columns}
        except storage.StorageUnreachableError:
            raise
        except Exception as exc:
            if storage.unreachable_endpoint(exc) is not None:
                raise
            raise _Delivered(row, f"row group {g}: {type(exc).__name__}: {exc}") from exc
        for i in range(rows):
            position = begin + i
            natural, error, detail = _cell_key(raw_keys[i] if raw_keys is not None else None, position, spec)
            key = keys.take(natural)
            if position < start or position >= stop:
                continue
            columns = KeptColumns({c: kept[c][i] for c in spec.keep_columns}, spec.kept_schema) \
                if spec.keep_columns else None
            url = f"{part.url}#{position}"
            data = images[i]
            if error:
                yield EncodedSample(f"{namespace}/{key}", url, None, error, detail, columns)
            elif not data:
                what = "null" if data is None else "empty"
                yield EncodedSample(f"{namespace}/{key}", url, None, "empty",
                                    f"row {position}: the image cell is {what}", columns)
            else:
                yield EncodedSample(f"{namespace}/{key}", url, data, columns=columns)
            row = position + 1
        begin = end
