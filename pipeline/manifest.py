"""The inference manifest: one Parquet part per committed work unit, and ``_SUCCESS`` when all are in.

A part is written last and atomically, so its existence is the unit's commit. Readers (pyarrow,
DuckDB, Spark) read ``OUT/manifest/*.parquet`` as one dataset with one row per input.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source_url", pa.string()),
        ("output_url", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("error_detail", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("out_width", pa.int32()),
        ("out_height", pa.int32()),
        ("input_bytes", pa.int64()),
        ("output_bytes", pa.int64()),
        ("output_sha256", pa.string()),
        ("source_mode", pa.string()),
        ("output_mode", pa.string()),
        ("dropped", pa.string()),
        ("model_id", pa.string()),
        ("preset", pa.string()),
        ("elapsed_ms", pa.float64()),
        ("worker", pa.int32()),
        ("unit", pa.int32()),
    ]
)
# The values of the `error` column; `error_detail` holds the message.
ERROR_CODES = {
    "empty": "the input has no bytes",
    "not-an-image": "no image format recognises the bytes",
    "unsupported-format": "an image format this project does not decode (pipeline.formats)",
    "truncated": "the image data ends early",
    "corrupt": "the image data does not decode",
    "too-large": "more pixels than --max-pixels at the source or after any resize (decompression bombs "
                 "included), or an output side longer than the output format stores",
    "too-large-for-device": "the device ran out of memory for this image alone, at batch size 1",
    "out-of-memory": "the host could not allocate memory to decode, resize or encode this image",
    "read-error": "the input could not be read from storage (after retries)",
    "shard-error": "the input shard is missing, breaks off, or holds samples its index does not list",
    "no-image": "a shard sample without an image member",
    "channel-mismatch": "an .npy array whose channel count the model cannot take (only 1-4 channels convert)",
    "outside-input": "a symlink in a listed folder that leads outside it: refused, never read",
    "unsafe-key": "a key that would name a path outside the output (absolute, '..', control characters)",
}
SUCCESS = "_SUCCESS"
_PART = re.compile(r"part-(\d{6})\.parquet$")


def manifest_dir(out_url: str) -> str:
    return storage.join(out_url, "manifest")


def part_url(out_url: str, unit: int) -> str:
    return storage.join(manifest_dir(out_url), f"part-{unit:06d}.parquet")


def part_table(rows: Sequence[dict[str, Any]]) -> pa.Table:
    """A unit's manifest rows as a table (ValueError for an error code not in ERROR_CODES): the SCHEMA
    columns, then a table input's kept columns (each row's ``row["columns"]``, typed by its
    ``.schema`` where it has one, as `pipeline.tables.KeptColumns` do)."""
    unknown = {row["error"] for row in rows if row.get("error")} - set(ERROR_CODES)
    if unknown:
        raise ValueError(f"unknown error codes {sorted(unknown)}; add them to ERROR_CODES")
    table = pa.Table.from_pylist([{name: row.get(name) for name in SCHEMA.names} for row in rows],
                                 schema=SCHEMA)
    for field, values in _kept_columns(rows):
        table = table.append_column(field, pa.array(values, type=field.type))
    return table


def _kept_columns(rows: Sequence[dict[str, Any]]) -> list[tuple[pa.Field, list[Any]]]:
    """The kept columns of rows that carry them: (field, one value per row; None where a row has none)."""
    first = next((row["columns"] for row in rows if row.get("columns")), None)
    if first is None:
        return []
    schema = getattr(first, "schema", None)
    kept = []
    for name in first:
        if name in SCHEMA.names:
            raise ValueError(f"kept column {name!r} has the name of a manifest column")
        values = [(row.get("columns") or {}).get(name) for row in rows]
        if schema is not None and name in schema.names:
            field = schema.field(name).remove_metadata()
        else:
            field = pa.field(name, pa.array(values).type)
        kept.append((field, values))
    return kept


def write_part(out_url: str, unit: int, rows: Sequence[dict[str, Any]]) -> str:
    """Commit a unit: its rows as one Parquet object, written atomically."""
    buffer = io.BytesIO()
    pq.write_table(part_table(rows), buffer, compression="zstd")
    url = part_url(out_url, unit)
    storage.write_bytes_atomic(url, buffer.getvalue())
    return url


def committed_units(out_url: str) -> set[int]:
    """Units whose manifest part exists (temporary files of interrupted local writes are ignored)."""
    folder = manifest_dir(out_url)
    if not storage.exists(folder):
        return set()
    found = set()
    for url in storage.list_files(folder):
        m = _PART.search(url)
        if m and url.rsplit("/", 1)[-1] == m.group(0):
            found.add(int(m.group(1)))
    return found


def read_manifest(out_url: str, columns: Sequence[str] | None = None) -> pa.Table:
    """All committed parts as one table.

    Parts are read without Arrow's thread pool: with torch loaded in the same process, that pool
    made about one exit in three abort ("terminate called without an active exception").
    """
    tables = [
        pq.read_table(
            io.BytesIO(storage.read_bytes(part_url(out_url, unit))), columns=columns, use_threads=False
        )
        for unit in sorted(committed_units(out_url))
    ]
    if not tables:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(list(columns))
    return pa.concat_tables(tables, promote_options="default")  # parts without kept columns: nulls


def write_success(out_url: str, totals: dict[str, Any]) -> str:
    url = storage.join(out_url, SUCCESS)
    storage.write_bytes_atomic(url, (json.dumps(totals, indent=1, sort_keys=True) + "\n").encode())
    return url
