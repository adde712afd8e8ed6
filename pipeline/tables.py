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
  null (an absolute path or URL: its file name), else the row's position in its part (`000123`).
  Keys are made safe (`pipeline.keys`), put under one namespace per part file
  (`part-0.parquet/000123`) and made unique within it in row order, so any row range derives the
  same keys as a pass over the whole part.
- kept: `--keep-columns` names columns (partition columns included) carried to the outputs.
The columns used must have one type in every part file; a part that differs is a `TableError`
naming the file and the column. Partition values (hive folders, the Delta log) are kept as strings.

Reading gives one `EncodedSample` per row, in row order. An Image struct with a `path` but no
`bytes` (what `datasets` writes for images loaded from files) is read from that path, as `datasets`
decodes it (relative: from the part's folder). A null or empty image cell is `empty`, an
unsafe key `unsafe-key`; a row group whose pages do not read, or a part that no longer opens, gives
`read-error` rows for exactly the rows its footer promised (with whatever kept columns still read).
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
    image_path: bool = False  # the Image struct has a `path`: read where its `bytes` are null

    def file_columns(self) -> list[str]:
        """The leaf columns a reader asks a part file for: nothing more than the rows need."""
        if self.image_kind == STRUCT:
            with_path = self.image_path or self.key_from_path
            columns = [f"{self.image_column}.bytes"] + [f"{self.image_column}.path"] * with_path
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
                "version": self.version, "image_path": self.image_path}

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> TableSpec:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["kept_schema"])))
        return cls(body["image_column"], body["image_kind"], body["key_column"], body["key_from_path"],
                   tuple(body["keep_columns"]), schema, body["version"], body.get("image_path", False))


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
        sizes = storage.list_sizes(root)  # one listing gives the names and sizes
        return root, parquet_parts(root, [storage.join(root, name) for name in sorted(sizes)], sizes)
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
                         f"nothing was written (where a plan already holds it, rerun with "
                         f"--skip-input-check: its planned rows become read-error rows)") from exc
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
        if pa.types.is_string(image.type) or pa.types.is_large_string(image.type):
            raise TableError(f"{where}: column {image.name!r} holds strings, not encoded images; a Parquet "
                             f"list of URLs is read as a listing (its column `url`, else its first) when "
                             f"--image-column is not given")
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
    has_path = kind == STRUCT and image.type.get_field_index("path") >= 0
    return TableSpec(image.name, kind, key, key is None and has_path, tuple(options.keep_columns),
                     pa.schema(kept_fields), version, has_path)


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


def is_table_file(url: str, options: TableOptions = TableOptions()) -> bool:
    """A table without listing a folder: a Delta table, or one `.parquet` file holding an image column
    (one without stays a list of URLs)."""
    if is_delta(url):
        return True
    return (is_parquet_name(url) and not storage.has_glob(url) and not storage.is_dir(url)
            and storage.exists(url) and parquet_is_image_table(url, options))


def is_table_listing(url: str, files: Sequence[str]) -> bool:
    """A folder, prefix or glob whose listing (`files`) is a Parquet dataset: part files, no images."""
    return (storage.has_glob(url) or storage.is_dir(url)) and looks_like_table(url, files)


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
    if raw is _UNREADABLE:
        return f"unreadable-{row:06d}", "", ""
    if raw is None or raw == "":
        return f"{row:06d}", "", ""
    if spec.key_column is None:  # the Image struct's path: a relative path, or an absolute one's name
        path = str(raw)
        key = path_key(posixpath.basename(storage.url_path(path)) if "://" in path or path.startswith("/")
                       else path)
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
    `empty` sample. Rows that cannot be read give `read-error` samples, never fewer rows: a row group
    whose pages do not read (its kept columns and keys still, where their own pages do), or every
    row not yet delivered of a part that cannot be opened or whose footer no longer matches the plan.
    Storage that stays unreachable raises storage.StorageUnreachableError.
    """
    spec = table.spec if isinstance(table, TableInput) else table
    stop = part.rows if row_stop is None else row_stop
    namespace = namespace if namespace is not None else part.namespace
    keys = KeyAllocator()
    delivered = [row_start]  # the next row to deliver, as _read_rows advances it
    try:
        with storage.open_read(part.url, size=part.size) as f:
            parquet = pq.ParquetFile(f)
            meta = parquet.metadata
            groups = tuple(meta.row_group(g).num_rows for g in range(meta.num_row_groups))
            if meta.num_rows != part.rows or (part.row_groups and groups != part.row_groups):
                raise OSError(f"the part file changed since it was planned ({meta.num_rows} rows in "
                              f"{len(groups)} row groups; planned: {part.rows} in {len(part.row_groups)})")
            reader = _GroupReader(parquet, part.url)
            yield from _read_rows(reader, groups, spec, part, row_start, stop, namespace, keys, delivered)
            return
    except storage.StorageUnreachableError:
        raise
    except Exception as exc:
        storage.raise_if_unreachable(exc, part.url)
        failure = f"{type(exc).__name__}: {exc}"
    log.error("part file %s unreadable from row %d: %s", part.url, delivered[0], failure)
    kept = _partition_only(spec, part)
    for row in range(delivered[0], stop):
        key = keys.take(f"unreadable-{row:06d}")
        yield EncodedSample(f"{namespace}/{key}", f"{part.url}#{row}", None, "read-error", failure, kept)


class _GroupReader:
    """Reads columns of one row group at a time; a group that does not read is (None, why)."""

    def __init__(self, parquet: pq.ParquetFile, url: str) -> None:
        self.parquet, self.url = parquet, url

    def read(self, group: int, columns: list[str]) -> tuple[pa.Table | None, str]:
        try:
            return self.parquet.read_row_group(group, columns=columns, use_threads=False), ""
        except storage.StorageUnreachableError:
            raise
        except Exception as exc:
            storage.raise_if_unreachable(exc, self.url)
            return None, f"row group {group}: {type(exc).__name__}: {exc}"


def _partition_only(spec: TableSpec, part: TablePart) -> KeptColumns | None:
    """The kept columns of a row that could not be read: partition values, file columns null."""
    if not spec.keep_columns:
        return None
    values = dict(part.partition)
    return KeptColumns({c: values.get(c) for c in spec.keep_columns}, spec.kept_schema)


@dataclass
class _Group:
    """One row group's cells as read: images (None where unread), key cells (None without a keyed
    rule), kept column values, and why the images did not read ("" if they did)."""

    images: list[bytes | None]
    keys: list[Any] | None
    kept: dict[str, list[Any]]
    failure: str = ""
    paths: list[str | None] | None = None  # the Image struct's paths, for cells without bytes


def _read_group(reader: _GroupReader, g: int, rows: int, spec: TableSpec,
                partition: dict[str, Any]) -> _Group:
    """The cells of row group `g`; when its images do not read, the key and kept columns that still do."""
    table, failure = reader.read(g, spec.file_columns())
    if table is None:
        log.error("part file %s: %s", reader.url, failure)
        images = {spec.image_column, f"{spec.image_column}.bytes"}
        others = [c for c in spec.file_columns() if c not in images]
        table = reader.read(g, others)[0] if others else None
    keyed = spec.key_column is not None or spec.key_from_path
    unread = [_UNREADABLE] * rows
    return _Group(
        _image_values(table, spec) if not failure and table is not None else [None] * rows,
        (_key_values(table, spec) if table is not None else unread) if keyed else None,
        {c: (table.column(c).to_pylist() if table is not None and c in table.column_names
             else [partition.get(c)] * rows) for c in spec.keep_columns},
        failure,
        pc.struct_field(table.column(spec.image_column), "path").to_pylist()
        if spec.image_path and not failure and table is not None else None)


def _read_rows(reader: _GroupReader, groups: tuple[int, ...], spec: TableSpec, part: TablePart, start: int,
               stop: int, namespace: str, keys: KeyAllocator, delivered: list[int]
               ) -> Iterator[EncodedSample]:
    """The rows, row group by row group: groups before `start` are read for their keys only. A group
    whose images do not read gives read-error rows, with the keys and kept columns that still read."""
    keyed = spec.key_column is not None or spec.key_from_path
    key_columns = ([spec.key_column] if spec.key_column else [f"{spec.image_column}.path"]) if keyed else []
    partition = dict(part.partition)
    begin = 0
    for g, rows in enumerate(groups):
        if begin >= stop:
            break
        end = begin + rows
        if end <= start:  # keys of earlier rows, so this range allocates as one pass over the part would
            if keyed:
                table, _ = reader.read(g, key_columns)
                cells = _key_values(table, spec) if table is not None else [_UNREADABLE] * rows
                for i, raw in enumerate(cells):
                    keys.take(_cell_key(raw, begin + i, spec)[0])
            begin = end
            continue
        group = _read_group(reader, g, rows, spec, partition)
        for i in range(rows):
            position = begin + i
            raw = group.keys[i] if group.keys is not None else None
            natural, error, detail = _cell_key(raw, position, spec)
            key = keys.take(natural)
            if position < start or position >= stop:
                continue
            columns = KeptColumns({c: group.kept[c][i] for c in spec.keep_columns}, spec.kept_schema) \
                if spec.keep_columns else None
            url = f"{part.url}#{position}"
            data = group.images[i]
            if group.failure:
                yield EncodedSample(f"{namespace}/{key}", url, None, "read-error", group.failure, columns)
            elif error:
                yield EncodedSample(f"{namespace}/{key}", url, None, error, detail, columns)
            elif not data and group.paths is not None and group.paths[i]:
                yield _from_path(f"{namespace}/{key}", url, group.paths[i], part.url, position, columns)
            elif not data:
                what = "null" if data is None else "empty"
                yield EncodedSample(f"{namespace}/{key}", url, None, "empty",
                                    f"row {position}: the image cell is {what}", columns)
            else:
                yield EncodedSample(f"{namespace}/{key}", url, data, columns=columns)
            delivered[0] = position + 1
        begin = end


def _from_path(key: str, url: str, path: str, part_url: str, position: int,
               columns: KeptColumns | None) -> EncodedSample:
    """A `datasets` Image cell that holds a path but no bytes (what `Dataset.to_parquet` writes for
    images loaded from files): the file it names, read as `datasets` would (a relative path from the
    part's folder); `read-error` if it cannot be read."""
    source = path if "://" in path or path.startswith("/") else storage.join(storage.dirname(part_url), path)
    try:
        return EncodedSample(key, url, storage.read_bytes(source), columns=columns)
    except storage.StorageUnreachableError:
        raise
    except Exception as exc:
        detail = f"row {position}: the Image cell holds no bytes, and its path {source} does not read " \
                 f"({type(exc).__name__}: {exc})"
        return EncodedSample(key, url, None, "read-error", detail, columns)


_UNREADABLE = object()  # a key cell whose row group does not read
