"""Translated images as a table: one Parquet part per unit (``--format table``) or one Delta
transaction per unit (``--format delta``), written before the unit's manifest part, which stays its
commit.

```
OUT/table/part-%06d.parquet   --format table: one part per unit, written atomically; a part without
                              its manifest part (a worker killed in between) is rewritten by the rerun
OUT/table/                    --format delta: a Delta table; unit i is one append whose commit
                              carries the application transaction (txn) "<job>/unit-<i>", so a unit
                              retried after its commit finds it in the log and appends nothing
```

Both hold one row per input, in input order: ``image``, the output in the Hugging Face ``datasets``
Image layout (a struct of the encoded ``bytes`` and a ``path``: the output key with the image
extension; null for an error row), then the manifest's columns (pipeline.manifest.part_table).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import delta, storage
from pipeline.manifest import part_table
from pipeline.plan import PlanError, load_plan

TABLE_FORMATS = ("table", "delta")
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
# What `datasets` reads from a Parquet file's schema metadata to decode the column as an Image feature
# (Dataset.to_parquet writes every column's feature there; `datasets` takes the features named and
# derives the others from their Arrow types). npy outputs are no image `datasets` decodes: no feature.
HF_FEATURES = {"info": {"features": {"image": {"_type": "Image"}}}}
HF_IMAGE_METADATA = {b"huggingface": json.dumps(HF_FEATURES).encode()}
# Rows per row group: Dataset.to_parquet's for image datasets, so readers stream a part in small steps.
ROW_GROUP_ROWS = 100


def table_url(out: str) -> str:
    return storage.join(out, "table")


def table_part_url(out: str, unit: int) -> str:
    return storage.join(table_url(out), f"part-{unit:06d}.parquet")


def unit_table(rows: Sequence[dict[str, Any]], images: dict[int, bytes], image_format: str) -> pa.Table:
    """A unit's rows as a table: ``image`` (from ``images`` by the row's ``order``; null where a row has
    none) before the manifest columns."""
    cells = [{"bytes": images[row["order"]], "path": f"{row['key']}.{image_format}"}
             if row["order"] in images else None for row in rows]
    table = part_table(rows)
    table = table.add_column(0, pa.field("image", IMAGE_TYPE), pa.array(cells, IMAGE_TYPE))
    return table.replace_schema_metadata(None if image_format == "npy" else HF_IMAGE_METADATA)


def job_id(out: str) -> str:
    """The name of the job under ``out`` in Delta application transactions: a hash of its plan's
    identity and creation time (a new plan under the same OUT is a new job)."""
    plan = load_plan(out)
    if plan is None:
        raise PlanError(f"{out} has no plan: units commit only within a planned job")
    body = json.dumps({"identity": plan.identity, "created": plan.created}, sort_keys=True)
    return "cut-pipeline/" + hashlib.sha256(body.encode()).hexdigest()[:16]


def unit_app_id(job: str, unit: int) -> str:
    return f"{job}/unit-{unit:06d}"


def write_unit(out: str, fmt: str, unit: int, rows: Sequence[dict[str, Any]], images: dict[int, bytes],
               image_format: str) -> str:
    """Store a unit's table rows before its manifest part commits it: the Parquet part (atomically,
    replacing one a killed attempt left), or the Delta append (once per job and unit). Returns where."""
    table = unit_table(rows, images, image_format)
    if fmt == "table":
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
        url = table_part_url(out, unit)
        storage.write_bytes_atomic(url, buffer.getvalue())
        return url
    if fmt == "delta":
        url = table_url(out)
        delta.append_once(url, table, unit_app_id(job_id(out), unit))
        return url
    raise ValueError(f"not a table format: {fmt}")
