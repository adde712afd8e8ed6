"""Process setup shared by the jobs: the allocator keeps freed activations for reuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.runtime import reuse_freed_memory

ROOT = Path(__file__).resolve().parent.parent

ROUNDS = """
import json, resource, sys
import torch
from jobs.runtime import reuse_freed_memory
applied = sys.argv[1] == "tuned" and reuse_freed_memory()
counts = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(2 << 20) for _ in range(10)]  # 10 x 8 MiB, as a forward's activations
    del tensors
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": counts}))
"""


def _page_faults(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_activations_are_reused_without_page_faults():
    """Each round allocates and frees 80 MiB: glibc's defaults hand it back to the kernel and fault
    it in again (20,000 faults a round); after reuse_freed_memory the later rounds reuse it."""
    default, tuned = _page_faults("default"), _page_faults("tuned")
    assert tuned["applied"]
    assert sum(default["faults"][1:3]) > 20_000
    assert sum(tuned["faults"][2:]) < 4096


def test_a_user_s_own_malloc_thresholds_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert not reuse_freed_memory()
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert not reuse_freed_memory()
