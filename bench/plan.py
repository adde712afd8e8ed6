"""Planning a data lake once, and a worker's start from the frozen plan, at 10^5 and 10^6 inputs.

    python -m bench.plan [--sizes 100000 1000000] [--workers 64] [--unit-size 1000]
    python -m bench.plan --table [--parts 200] [--row-group-size 1000] [--sizes ...]

For each size, a `.txt` listing of generated object URLs (no files needed: planning never reads
an image) is planned in a fresh process, which reports its wall time and peak memory (RSS, the
interpreter and libraries included). Then, in another fresh process, each of `--workers`
simulated workers starts as jobs.infer does: read the plan, take its own units (unit i % workers),
and read the items of its first unit; the slowest start is the figure that matters. The last
lines say how each figure grows from the smallest size to the largest.
Goals: planning <= 60 s and <= 1 GiB at 10^6; a worker's start <= 2 s, flat in size.

`--table` plans a Parquet table instead: N rows in `--parts` part files (a binary image column of a
few bytes a row and a string key column, written once with pyarrow outside the timing), planned by
jobs.infer's planner from the footers alone. A worker's start reads the plan, takes its units and
reads the rows of its first unit (the image bytes of one unit, as its first batch would).
Goals (issue #28): planning 10^6 rows in 200 parts <= 30 s and <= 1 GiB; a worker's start <= 2 s.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

from bench.child import run_json

PLAN = """
import json, resource, sys, time
from pipeline.plan import make_plan
from pipeline.tables import TableOptions
listing, out, unit_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
tables = TableOptions(key_column=sys.argv[4]) if len(sys.argv) > 4 else None  # a table's key column
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
plan = make_plan(out, [listing], {"model_sha256": "bench"}, unit_size, tables=tables)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_mib": peak / 1024, "before_mib": rss0 / 1024,
                  "units": plan.units, "items": plan.items}))
"""

START = """
import json, sys, time
from pipeline.corpus import read_items
from pipeline.plan import load_plan, worker_units
out, workers = sys.argv[1], int(sys.argv[2])
starts, loads = [], []
for worker in range(workers):
    t0 = time.perf_counter()
    plan = load_plan(out)
    units = worker_units(plan, worker, workers)
    first = read_items(units[0]) if units else ()
    starts.append(time.perf_counter() - t0)
    items = len(first) + sum(len(read_items(u)) for u in units[1:])
    loads.append(time.perf_counter() - t0)
print(json.dumps({"start_max": max(starts), "start_mean": sum(starts) / len(starts),
                  "all_items_max": max(loads), "units_per_worker": len(units), "items_last": items}))
"""


TABLE_START = """
import json, sys, time
from pipeline.corpus import read_unit
from pipeline.plan import load_plan, worker_units
out, workers = sys.argv[1], int(sys.argv[2])
starts, reads = [], []
for worker in range(workers):
    t0 = time.perf_counter()
    plan = load_plan(out)
    units = worker_units(plan, worker, workers)
    starts.append(time.perf_counter() - t0)
    rows = sum(1 for _ in read_unit(units[0])) if units else 0
    reads.append(time.perf_counter() - t0)
print(json.dumps({"start_max": max(starts), "start_mean": sum(starts) / len(starts),
                  "first_unit_max": max(reads), "units_per_worker": len(units), "rows_first": rows}))
"""


def write_table(folder: Path, n: int, parts: int, row_group_size: int) -> None:
    """N rows in `parts` Parquet files: `image` (binary, 8 bytes a row, distinct) and `key` (string).

    Built from buffers, not Python objects, so 10^6 rows take about a second to write.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    for part, (start, stop) in enumerate(itertools.pairwise(bounds)):
        rows = int(stop - start)
        payload = np.empty((rows, 2), np.uint32)
        payload[:, 0] = 0xE0FFD8FF  # a JPEG start: never decoded, planning reads no image bytes
        payload[:, 1] = np.arange(start, stop, dtype=np.uint32)
        offsets = pa.py_buffer(np.arange(0, 8 * rows + 1, 8, dtype=np.int32))
        images = pa.Array.from_buffers(pa.binary(), rows, [None, offsets, pa.py_buffer(payload.tobytes())])
        keys = pa.array([f"photos/img-{i:08d}" for i in range(start, stop)], pa.string())
        pq.write_table(pa.table({"key": keys, "image": images}), folder / f"part-{part:05d}.parquet",
                       row_group_size=row_group_size)


def write_listing(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(f"s3://lake/photos/d{i // 1000:05d}/img-{i:08d}.jpg\n")


def child(code: str, *args: str) -> dict:
    return run_json([sys.executable, "-c", code, *args])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--workers", type=int, default=64)
    p.add_argument("--unit-size", type=int, default=1000)
    p.add_argument("--table", action="store_true", help="plan a Parquet table of N rows, not a listing")
    p.add_argument("--parts", type=int, default=200, help="--table: part files (default: 200)")
    p.add_argument("--row-group-size", type=int, default=1000, help="--table: rows per row group")
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            out = Path(tmp) / f"out-{n}"
            if args.table:
                source = Path(tmp) / f"table-{n}"
                write_table(source, n, args.parts, args.row_group_size)
            else:
                source = Path(tmp) / f"lake-{n}.txt"
                write_listing(source, n)
            plan = child(PLAN, str(source), str(out), str(args.unit_size), *["key"] * args.table)
            start = child(TABLE_START if args.table else START, str(out), str(args.workers))
            results[n] = {**plan, **start}
            what = f"rows in {args.parts} parts" if args.table else "inputs"
            last = (f"first unit read max {start['first_unit_max']:.2f} s" if args.table
                    else f"all own items max {start['all_items_max']:.2f} s")
            print(f"{n:>9} {what}, {plan['units']} units: plan {plan['seconds']:6.2f} s, peak "
                  f"{plan['peak_mib']:6.0f} MiB (interpreter and libraries {plan['before_mib']:.0f}); "
                  f"{args.workers} workers: start max {start['start_max'] * 1000:6.1f} ms, mean "
                  f"{start['start_mean'] * 1000:6.1f} ms; {last}", flush=True)
    small, large = min(results), max(results)
    if small != large:
        a, b = results[small], results[large]
        unit = "rows" if args.table else "inputs"
        print(f"growth {small} -> {large} {unit} ({large / small:.0f}x): plan time "
              f"{b['seconds'] / a['seconds']:.1f}x, peak memory {b['peak_mib'] / a['peak_mib']:.1f}x, "
              f"worker start {b['start_max'] / a['start_max']:.2f}x")


if __name__ == "__main__":
    main()
