"""`make demo`, the README's main command, runs end to end on a fresh checkout's CPU."""

import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, DEMO_OUT=str(out), DEMO_STEPS="20")
    done = subprocess.run(["make", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo finished" in done.stdout
    manifest = pq.read_table(str(out / "translated" / "manifest"))
    assert manifest.num_rows == 8 and set(manifest.column("status").to_pylist()) == {"ok"}
    assert (out / "translated" / "_SUCCESS").exists()
    assert any((out / "run" / "tb").iterdir())
    assert len(list((out / "translated" / "images").rglob("*.png"))) == 8

