"""`make demo`, the README's first command, translates visibly on a fresh checkout's CPU: the same
command and settings a new user runs, held to the translation score it promises."""

import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_demo_translates_shapes_and_reports_scores_against_the_identity(tmp_path):
    out = tmp_path / "demo"
    # One thread a process: `make test` runs two test files at once on two cores, and the demo's own
    # choice (every core for training) then makes two OpenMP pools fight over them, which costs CPU
    # time without changing a step's result by more than its summation order.
    env = dict(os.environ, DEMO_OUT=str(out), OMP_NUM_THREADS="1")
    env.pop("DEMO_STEPS", None)
    done = subprocess.run(["make", "demo"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "demo finished" in done.stdout

    metrics = json.loads((out / "metrics.json").read_text())
    score, identity = metrics["translation_score"], metrics["identity_translation_score"]
    assert score >= 0.5 and score >= 2 * identity, (score, identity)
    assert metrics["classifier_accuracy"] >= 0.8 and metrics["warnings"] == []

    manifest = pq.read_table(str(out / "translated" / "manifest"))
    assert manifest.num_rows == 16 and set(manifest.column("status").to_pylist()) == {"ok"}
    outputs = list((out / "translated" / "images").rglob("*.png"))
    assert len(outputs) == 16 and {Image.open(p).size for p in outputs} == {(64, 64)}  # the input size

    page = (out / "report.html").read_text()
    shown = re.findall(r'<img src="(samples/[^"]+)"', page)
    assert len(shown) == 32 and all((out / name).exists() for name in shown)  # 16 inputs beside outputs
    assert "identity (inputs)" in page and "translation score" in page
    assert any((out / "run" / "tb").iterdir())
