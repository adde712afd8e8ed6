"""Table rows on their way into a shard set: which SOURCE of `python -m jobs.shard` is a table, and its
rows as cells for `pipeline.ingest`, read through `pipeline.tables`.

A SOURCE is a table by jobs.infer's rule (`pipeline.tables.is_table_file`, `is_table_listing`): a
Delta table, a `.parquet` file with an image column (one without stays a list of URLs), or a folder,
prefix or glob of `.parquet` part files and no images. Its rows are read part by part, row group by
row group, only the image and key columns.

Keys: the key column's value, or the `datasets` Image struct's path (`pipeline.tables` makes them
safe and unique within a part file), with dots in the last segment made `_` (WebDataset ends a key at
its first dot there); a row with neither is keyed by its part file and position,
`<part path>/<row>`. Uniqueness over the whole set is `pipeline.ingest`'s (`~2`, `~3`, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.keys import path_key
from pipeline.tables import (
    TableInput,
    TableOptions,
    TablePart,
    open_table,
    table_samples,
)

_NAMESPACE = "_"  # table_samples keys `<namespace>/<key>`; a shard set's keys need no part namespace
# The keys pipeline.tables gives a row without a key of its own (or with an unsafe or unreadable one).
_POSITIONAL = re.compile(r"(?:unsafe-key-|unreadable-)?(\d{6,})(?:~\d+)?")


@dataclass(frozen=True, slots=True)
class TableCell:
    """One table row's image, already read: `key` is safe (`pipeline.keys`) but not yet unique over the
    set, `url` names the row (`<part file>#<row>`), `data` is None when `error` says why."""

    key: str
    url: str
    file: str
    row: int
    data: bytes | None
    error: str = ""
    detail: str = ""


@dataclass(frozen=True)
class TableRows:
    """A SOURCE opened as a table (footers read and checked): its row count and its rows in order."""

    url: str
    table: TableInput

    @property
    def count(self) -> int:
        return self.table.rows

    def cells(self) -> Iterator[TableCell]:
        """Every row of every part file, in order; an unreadable part gives `read-error` cells for the
        rows its footer promised, never fewer."""
        for part in self.table.parts:
            for sample in table_samples(self.table, part, namespace=_NAMESPACE):
                row = int(sample.url.rsplit("#", 1)[1])
                yield TableCell(shard_key(sample.key, part, row), sample.url, part.url, row, sample.data,
                                sample.error, sample.error_detail)


def shard_key(sample_key: str, part: TablePart, row: int) -> str:
    """A shard member key for a row keyed `sample_key` by `table_samples` (namespace `_NAMESPACE`)."""
    natural = sample_key.removeprefix(f"{_NAMESPACE}/")
    positional = _POSITIONAL.fullmatch(natural)
    if positional and int(positional.group(1)) == row:
        return f"{path_key(part.name)}/{natural}"
    head, _, last = natural.rpartition("/")
    last = last.replace(".", "_")
    return f"{head}/{last}" if head else last


def open_rows(spec: str, options: TableOptions) -> TableRows:
    """The table at `spec` (TableError for one that cannot be read as asked, naming file and column)."""
    table = open_table(spec, options.image_column, options.key_column, (), options.version)
    return TableRows(spec, table)
