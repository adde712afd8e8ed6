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
    want = {"jobs.infer end to end 32x32", "jobs.train data_wait", "largest training batch", "train step 32"}
    assert want <= benches
    waits = [r["batch"] for r in records if r.get("bench") == "jobs.train data_wait"]
    assert waits == [1, 2]  # batch 1 and the largest that fits (the smoke probe stops at 2)
    assert all("error" not in r for r in records) and records[-1]["done"] is True


@pytest.mark.parametrize("fmt", ["png", "png-pillow"])
def test_the_host_benchmark_measures_each_output_format(tmp_path, fmt):
    """bench.host swaps the PNG encoder for Pillow's: it must follow the encoder's interface."""
    import numpy as np
    from PIL import Image

    files = []
    for i in range(3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(path)
        files.append(str(path))
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(files) + "\n")
    cmd = [sys.executable, "-m", "bench.host", "--_one", str(listing), str(tmp_path / "out"), "32", fmt]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["images"] == 3 and result["stages"]["encode"] > 0
