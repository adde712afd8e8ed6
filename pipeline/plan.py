"""The frozen plan of an inference job: made once under ``OUT/_plan/``, then read by every worker.

```
OUT/_plan/plan.json                 the job's identity (inputs as given, model hash, every option
                                    that changes outputs), each input's count and listing digest, the
                                    unit count, and where its tables are; created last, exclusively:
                                    its existence commits the plan, and only one plan can commit
OUT/_plan/r<N>-<id>/units.parquet   revision N's units: kind, range, shard or table part (its size,
                                    rows, row groups, partition values), key namespace, items file
OUT/_plan/r<N>-<id>/items-%06d.parquet  listing items (url, key, known error) of up to 64 units, one
                                    row group per unit, so a worker reads only its own units' rows
```

Planning lists every input once (never anything under OUT). Workers and reruns read the plan
instead of listing again. A rerun can relist to find inputs that appeared or vanished since, and
either refuse or extend the plan with the new ones as new units (a new revision whose unit table
repeats the old units); units once planned never change, so committed manifest parts stay valid.
Who plans, and how the others wait, is `pipeline.planner`.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.corpus import (
    ITEMS_SCHEMA,
    LISTING,
    SHARDS,
    TABLE,
    InputListing,
    UnitLayout,
    WorkUnit,
    lay_out_units,
    list_input,
)
from pipeline.keys import KeyAllocator
from pipeline.tables import TableInput, TableOptions, TablePart, TableSpec

log = logging.getLogger(__name__)

PLAN_DIR = "_plan"
PLAN_VERSION = 1
UNITS_PER_BLOCK = 64
UNITS_SCHEMA = pa.schema([
    ("index", pa.int64()), ("input_index", pa.int32()), ("kind", pa.string()), ("start", pa.int64()),
    ("stop", pa.int64()), ("shard_url", pa.string()), ("shard_bytes", pa.int64()), ("namespace", pa.string()),
    ("last_of_shard", pa.bool_()), ("items_file", pa.string()), ("row_group", pa.int32()),
    # table units: the part's rows, the row groups [group_start, group_stop) read, partition values (JSON)
    ("part_rows", pa.int64()), ("group_start", pa.int32()), ("group_stop", pa.int32()),
    ("partition", pa.string()),
])


class PlanError(ValueError):
    """A plan that does not fit this run (other inputs, model or options), or that never came."""


@dataclass
class PlannedInput:
    """What the plan knows of one input: as given, its kind, and the listing it was planned from (a
    table's: the columns read and the Delta version, `pipeline.tables.TableSpec.to_json`)."""

    url: str
    kind: str
    count: int
    digest: str
    skipped: int = 0
    excluded: int = 0
    duplicates: int = 0
    table: dict[str, Any] | None = None


@dataclass
class JobPlan:
    out: str
    identity: dict[str, Any]
    inputs: list[PlannedInput]
    units: int
    items: int
    unit_size: int
    units_file: str
    revision: int = 1
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        body = {"version": PLAN_VERSION, **asdict(self)}
        body.pop("out")
        return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


@dataclass
class InputChanges:
    """How one input lists now against the plan."""

    input_index: int
    url: str
    new: list[str]
    gone: list[str]
    changed: list[str]

    def __bool__(self) -> bool:
        return bool(self.new or self.gone or self.changed)

    def describe(self) -> str:
        parts = [f"{len(self.new)} new", f"{len(self.gone)} gone"] + [f"{len(self.changed)} changed"] * bool(
            self.changed)
        examples = [f"{what} e.g. {', '.join(urls[:3])}" for what, urls in
                    (("new", self.new), ("gone", self.gone), ("changed", self.changed)) if urls]
        return f"input {self.input_index} ({self.url}): {', '.join(parts)} ({'; '.join(examples)})"


def plan_dir(out: str) -> str:
    return storage.join(out, PLAN_DIR)


def plan_json_url(out: str) -> str:
    return storage.join(plan_dir(out), "plan.json")


def _revision_dir(revision: int) -> str:
    """A folder of its own for each attempt at a revision, so concurrent planners never mix files."""
    return f"r{revision}-{uuid.uuid4().hex[:12]}"


def load_plan(out: str) -> JobPlan | None:
    """The committed plan under `out`, or None if there is none yet."""
    url = plan_json_url(out)
    try:
        body = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"{url} is not valid JSON ({exc}); use a new --out") from exc
    if body.pop("version", None) != PLAN_VERSION:
        raise PlanError(f"{url} was written by another version of this tool; use a new --out")
    body["inputs"] = [PlannedInput(**i) for i in body["inputs"]]
    return JobPlan(out=out, **body)


def check_identity(plan: JobPlan, identity: dict[str, Any]) -> None:
    """PlanError naming every difference between the plan's identity and this run's."""
    keys = sorted(set(plan.identity) | set(identity))
    differences = [f"{k}: planned {plan.identity.get(k)!r}, this run {identity.get(k)!r}"
                   for k in keys if plan.identity.get(k) != identity.get(k)]
    if differences:
        raise PlanError(
            f"{plan.out} holds a job planned with other settings; nothing was written.\n  "
            + "\n  ".join(differences)
            + "\nRerun with the planned settings to finish that job, or give a new --out.")


def make_plan(out: str, inputs: Sequence[str], identity: dict[str, Any], unit_size: int,
              tables: TableOptions | None = None) -> JobPlan:
    """List the inputs (nothing under `out`; tables with `tables`' column options), cut them into
    units and commit the plan; if another planner committed first, its plan (this attempt's files are
    removed)."""
    listings = list_inputs(out, inputs, tables)
    layout = lay_out_units(list(enumerate(listings)), unit_size, KeyAllocator(), KeyAllocator())
    folder = _revision_dir(1)
    items_files = _write_items(out, folder, layout, dict(enumerate(listings)), first_block=0)
    plan = JobPlan(
        out, identity, [_planned(url, listing) for url, listing in zip(inputs, listings, strict=True)],
        units=len(layout.units), items=sum(listing.count for listing in listings), unit_size=unit_size,
        units_file=_write_units(out, folder, [], layout.units, items_files),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if storage.write_bytes_exclusive(plan_json_url(out), plan.to_json()):
        return plan
    log.warning("another worker committed its plan first; using it")
    storage.remove_folder(storage.join(plan_dir(out), folder))
    committed = load_plan(out)
    assert committed is not None
    return committed


def check_input_urls(out: str, inputs: Sequence[str]) -> None:
    """PlanError for inputs that cannot make a job with `out`, found without listing or writing: an
    input at or under --out (--out equal to it included), or an input given twice."""
    inside_out = storage.within(out)
    for i, url in enumerate(inputs):
        if inside_out(url):
            raise PlanError(f"input {url} lies inside --out {out}: outputs would become inputs; nothing "
                            f"was written")
        if url.rstrip("/") in [u.rstrip("/") for u in inputs[:i]]:
            raise PlanError(f"input {url} is given twice; nothing was written")


def list_inputs(out: str, inputs: Sequence[str], tables: TableOptions | None = None) -> list[InputListing]:
    """Each input listed once, leaving out anything under the output prefix and any URL an earlier
    listing already holds (so every source gets one row); tables are opened with `tables`."""
    check_input_urls(out, inputs)
    inside_out = storage.within(out)
    listings, seen = [], set()
    for url in inputs:
        listing = list_input(url, exclude=inside_out, tables=tables)
        if listing.kind == LISTING:
            _drop_repeats(listing, seen)
        for count, what in ((listing.excluded, f"files under the output prefix {out} are left out"),
                            (listing.duplicates, "URLs listed before are left out"),
                            (len(listing.skipped), "files skipped, their names are not images")):
            if count:
                log.warning("%s: %d %s", url, count, what)
        listings.append(listing)
    return listings


def _drop_repeats(listing: InputListing, seen: set[str]) -> None:
    urls, keys = [], []
    for url, key in zip(listing.urls, listing.natural_keys, strict=True):
        if url not in seen:
            seen.add(url)
            urls.append(url)
            keys.append(key)
    listing.duplicates = len(listing.urls) - len(urls)
    listing.urls, listing.natural_keys = urls, keys


def _planned(url: str, listing: InputListing) -> PlannedInput:
    table = listing.table.spec.to_json() if listing.table is not None else None
    return PlannedInput(url, listing.kind, listing.count, listing.digest(), len(listing.skipped),
                        listing.excluded, listing.duplicates, table)


def _write_items(out: str, folder: str, layout: UnitLayout, listings: dict[int, InputListing],
                 first_block: int) -> dict[int, tuple[str, int]]:
    """Write the listing units' items, UNITS_PER_BLOCK units a file; returns unit index -> (items file
    relative to the plan folder, row group)."""
    listing_units = [u for u in layout.units if u.kind == LISTING]
    where = {}
    for b, start in enumerate(range(0, len(listing_units), UNITS_PER_BLOCK)):
        name = f"{folder}/items-{first_block + b:06d}.parquet"
        buffer = io.BytesIO()
        with pq.ParquetWriter(buffer, ITEMS_SCHEMA, compression="zstd") as writer:
            for row_group, unit in enumerate(listing_units[start:start + UNITS_PER_BLOCK]):
                table = _unit_table(unit, listings[unit.input_index], layout)
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                where[unit.index] = (name, row_group)
        storage.write_bytes_atomic(storage.join(plan_dir(out), name), buffer.getvalue())
    return where


def _unit_table(unit: WorkUnit, listing: InputListing, layout: UnitLayout) -> pa.Table:
    span = range(unit.start, unit.stop)
    errors = layout.errors[unit.input_index]
    known = [errors.get(i, (None, None)) for i in span] if errors else [(None, None)] * len(span)
    return pa.table({
        "url": listing.urls[unit.start:unit.stop],
        "key": layout.keys[unit.input_index][unit.start:unit.stop],
        "error": [e for e, _ in known], "error_detail": [d for _, d in known],
    }, schema=ITEMS_SCHEMA)


def _write_units(out: str, folder: str, old: list[dict[str, Any]], units: list[WorkUnit],
                 items_files: dict[int, tuple[str, int]]) -> str:
    """Write the unit table (`old` rows, then `units`); returns its name relative to the plan folder."""
    rows = old + [{
        "index": u.index, "input_index": u.input_index, "kind": u.kind, "start": u.start, "stop": u.stop,
        "shard_url": u.shard_url or None, "shard_bytes": u.shard_bytes, "namespace": u.namespace or None,
        "last_of_shard": u.last_of_shard, "items_file": items_files.get(u.index, (None, -1))[0],
        "row_group": items_files.get(u.index, (None, -1))[1],
        **({"part_rows": u.part.rows, "group_start": u.row_groups[0], "group_stop": u.row_groups[1],
            "partition": json.dumps(u.part.partition)} if u.part is not None else {}),
    } for u in units]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=UNITS_SCHEMA), buffer, compression="zstd")
    name = f"{folder}/units.parquet"
    storage.write_bytes_atomic(storage.join(plan_dir(out), name), buffer.getvalue())
    return name


def _units_table(plan: JobPlan) -> pa.Table:
    url = storage.join(plan_dir(plan.out), plan.units_file)
    try:
        with storage.open_read(url) as f:
            return pq.read_table(f)
    except FileNotFoundError as exc:
        raise PlanError(f"{url} is missing, yet {plan_json_url(plan.out)} exists; use a new --out") from exc


def _unit(plan: JobPlan, row: dict[str, Any], specs: dict[int, TableSpec] | None = None) -> WorkUnit:
    if row["kind"] == TABLE:
        return _table_unit(plan, row, {} if specs is None else specs)
    listing = row["kind"] == LISTING
    return WorkUnit(
        row["index"], row["input_index"], row["kind"], row["start"], row["stop"], row["shard_url"] or "",
        row["shard_bytes"], row["namespace"] or "", row["last_of_shard"],
        items_url=storage.join(plan_dir(plan.out), row["items_file"]) if listing else "",
        row_group=max(0, row["row_group"]), input_url=plan.inputs[row["input_index"]].url if listing else "")


def _table_unit(plan: JobPlan, row: dict[str, Any], specs: dict[int, TableSpec]) -> WorkUnit:
    """A table unit from its row of the unit table (the input's spec decoded once per input)."""
    i = row["input_index"]
    if i not in specs:
        specs[i] = TableSpec.from_json(plan.inputs[i].table or {})
    partition = tuple((k, v) for k, v in json.loads(row["partition"] or "[]"))
    part = TablePart(row["shard_url"], "", row["shard_bytes"], row["part_rows"], (), partition,
                     row["namespace"])
    return WorkUnit(row["index"], i, TABLE, row["start"], row["stop"], row["shard_url"], row["shard_bytes"],
                    row["namespace"], row["last_of_shard"], input_url=plan.inputs[i].url, table=specs[i],
                    part=part, row_groups=(row["group_start"], row["group_stop"]))


def worker_units(plan: JobPlan, worker: int, workers: int) -> list[WorkUnit]:
    """This worker's units (unit i belongs to worker i % workers), read from the plan's unit table."""
    table = _units_table(plan)
    mine = table.filter(pa.array(table.column("index").to_numpy() % workers == worker))
    specs: dict[int, TableSpec] = {}
    return [_unit(plan, row, specs) for row in mine.to_pylist()]


def all_units(plan: JobPlan) -> list[WorkUnit]:
    specs: dict[int, TableSpec] = {}
    return [_unit(plan, row, specs) for row in _units_table(plan).to_pylist()]


# ------------------------------------------------------------------------------------------ reruns
def compare_inputs(plan: JobPlan, listings: Sequence[InputListing]) -> list[InputChanges]:
    """Per input whose listing no longer matches the plan's digest: what is new, gone or changed."""
    changes = []
    units = None
    for i, (planned, listing) in enumerate(zip(plan.inputs, listings, strict=True)):
        if listing.digest() == planned.digest:
            continue
        units = units if units is not None else all_units(plan)
        mine = [u for u in units if u.input_index == i]
        if listing.kind != planned.kind:
            changes.append(InputChanges(i, planned.url, [], [], [f"was {planned.kind}, now {listing.kind}"]))
        elif listing.kind == TABLE:
            assert listing.table is not None
            before = _planned_shards(mine)
            now = {p.url: (p.rows, p.size) for p in listing.table.parts}
            changes.append(InputChanges(
                i, planned.url, [u for u in now if u not in before], sorted(set(before) - set(now)),
                sorted(u for u in now if u in before and before[u] != now[u])))
        elif listing.kind == LISTING:
            before = set(_planned_column(plan, mine, "url"))
            now = set(listing.urls)
            changes.append(InputChanges(i, planned.url, [u for u in listing.urls if u not in before],
                                        sorted(before - now), []))
        else:
            before = _planned_shards(mine)
            now = {storage.join(listing.base_url, s.name): (s.samples, s.bytes) for s in listing.shards}
            changes.append(InputChanges(
                i, planned.url, [u for u in now if u not in before], sorted(set(before) - set(now)),
                sorted(u for u in now if u in before and before[u] != now[u])))
    return [c for c in changes if c]


def _planned_column(plan: JobPlan, units: Sequence[WorkUnit], column: str) -> list[str]:
    """One column of the planned items of listing `units`, reading each block file once."""
    wanted: dict[str, set[int]] = {}
    for u in units:
        wanted.setdefault(u.items_url, set()).add(u.row_group)
    values: list[str] = []
    for url, groups in wanted.items():
        with storage.open_read(url) as f:
            parquet = pq.ParquetFile(f)
            values += parquet.read_row_groups(sorted(groups), columns=[column]).column(column).to_pylist()
    return values


def _planned_shards(units: Sequence[WorkUnit]) -> dict[str, tuple[int, int | None]]:
    shards: dict[str, tuple[int, int | None]] = {}
    for u in units:
        samples, _ = shards.get(u.shard_url, (0, None))
        shards[u.shard_url] = (samples + u.expected, u.shard_bytes)
    return shards


def extend_plan(plan: JobPlan, listings: Sequence[InputListing], changes: Sequence[InputChanges]) -> JobPlan:
    """Add the new inputs of `changes` as new units after the planned ones; commit the new revision."""
    old_rows = _units_table(plan).to_pylist()
    old_units = [_unit(plan, row) for row in old_rows]
    keys = KeyAllocator(set(_planned_column(plan, [u for u in old_units if u.kind == LISTING], "key")))
    namespaces = KeyAllocator({u.namespace for u in old_units if u.kind != LISTING})
    additions = []
    for change in changes:
        listing = listings[change.input_index]
        if listing.kind == LISTING:
            new = set(change.new)
            picked = [(u, k) for u, k in zip(listing.urls, listing.natural_keys, strict=True) if u in new]
            extra = InputListing(listing.url, LISTING, [u for u, _ in picked], [k for _, k in picked],
                                 outside={u: why for u, why in listing.outside.items() if u in new})
        elif listing.kind == TABLE:
            assert listing.table is not None
            new = set(change.new)
            table = TableInput(listing.url, tuple(p for p in listing.table.parts if p.url in new),
                               listing.table.spec)
            extra = InputListing(listing.url, TABLE, base_url=listing.url, table=table)
        else:
            names = {storage.join(listing.base_url, s.name): s for s in listing.shards}
            extra = InputListing(listing.url, SHARDS, base_url=listing.base_url,
                                 shards=tuple(names[u] for u in change.new))
        additions.append((change.input_index, extra))
    layout = lay_out_units(additions, plan.unit_size, keys, namespaces, first_unit=plan.units)
    folder = _revision_dir(plan.revision + 1)
    items_files = _write_items(plan.out, folder, layout, dict(additions), first_block=0)
    plan.units_file = _write_units(plan.out, folder, old_rows, layout.units, items_files)
    plan.units += len(layout.units)
    plan.items += sum(extra.count for _, extra in additions)
    plan.revision += 1
    for i, listing in enumerate(listings):
        plan.inputs[i] = _planned(plan.inputs[i].url, listing)
    storage.write_bytes_atomic(plan_json_url(plan.out), plan.to_json())
    return plan
