"""The prepared device check keeps working on machines without a device (its CPU smoke mode)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_prepared_gpu_check_runs_end_to_end_in_its_cpu_smoke_mode():
    """bench.gpu_check runs once per lent device, with no second try: every code path runs here."""
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    benches = {r.get("bench") for r in records}
    assert {"jobs.infer end to end 32x32", "jobs.train data_wait", "train step 32"} <= benches
    assert all("error" not in r for r in records) and records[-1]["done"] is True
