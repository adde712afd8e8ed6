"""Planning a data lake once, and a worker's start from the frozen plan, at 10^5 and 10^6 inputs.

    python -m bench.plan [--sizes 100000 1000000] [--workers 64] [--unit-size 1000]

For each size, a `.txt` listing of generated object URLs (no files needed: planning never reads
an image) is planned in a fresh process, which reports its wall time and peak memory (RSS, the
interpreter and libraries included). Then, in another fresh process, each of `--workers`
simulated workers starts as jobs.infer does: read the plan, take its own units (unit i % workers),
and read the items of its first unit; the slowest start is the figure that matters. The last
lines say how each figure grows from the smallest size to the largest.
Goals: planning <= 60 s and <= 1 GiB at 10^6; a worker's start <= 2 s, flat in size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.child import run_json

PLAN = """
import json, resource, sys, time
from pipeline.plan import make_plan
listing, out, unit_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
plan = make_plan(out, [listing], {"model_sha256": "bench"}, unit_size)
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
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            listing = Path(tmp) / f"lake-{n}.txt"
            write_listing(listing, n)
            out = Path(tmp) / f"out-{n}"
            plan = child(PLAN, str(listing), str(out), str(args.unit_size))
            start = child(START, str(out), str(args.workers))
            results[n] = {**plan, **start}
            print(f"{n:>9} inputs, {plan['units']} units: plan {plan['seconds']:6.2f} s, peak "
                  f"{plan['peak_mib']:6.0f} MiB (interpreter and libraries {plan['before_mib']:.0f}); "
                  f"{args.workers} workers: start max {start['start_max'] * 1000:6.1f} ms, mean "
                  f"{start['start_mean'] * 1000:6.1f} ms; all own items max {start['all_items_max']:.2f} s")
    small, large = min(results), max(results)
    if small != large:
        a, b = results[small], results[large]
        print(f"growth {small} -> {large} inputs ({large / small:.0f}x): plan time "
              f"{b['seconds'] / a['seconds']:.1f}x, peak memory {b['peak_mib'] / a['peak_mib']:.1f}x, "
              f"worker start {b['start_max'] / a['start_max']:.2f}x")


if __name__ == "__main__":
    main()
