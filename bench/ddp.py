"""Training throughput: one process with 2 threads against torchrun with 2 processes of 1 thread each.

    python -m bench.ddp [--steps 40]

Both run jobs.train on the same tiny config (configs/tiny.yaml, CPU, gloo) and the same generated
shards; images/s is the global rate jobs.train logs over the second half of the run (start-up
excluded), and the ratio is DDP over the single process.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from jobs.demo import make_shapes
from pipeline.ingest import build_shards

ROOT = Path(__file__).resolve().parent.parent


def images_per_s(launcher: list[str], threads: int, overrides: list[str], steps: int) -> float:
    """Run jobs.train under ``launcher``; the images/s of rank 0's last log window."""
    job = [
        "-m",
        "jobs.train",
        "--config",
        "configs/tiny.yaml",
        *overrides,
        f"train.max_steps={steps}",
        f"train.log_every={steps // 2}",
        "train.checkpoint_every=100000",
        "train.n_epochs=100",
        "train.n_epochs_decay=0",
        "data.workers=1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [*launcher, *job], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stderr
    return float(re.findall(r"rank=0 .*images/s=([0-9.]+)", out)[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_shapes(root / "data", per_domain=80)
        data = []
        for d in ("A", "B"):
            build_shards(
                [str(root / "data" / f"train{d}")], str(root / d), prefix=d, max_count=20, progress=False
            )
            data.append(f"data.{d.lower()}={root / d}")
        one = images_per_s([sys.executable], 2, [*data, f"run.url={root / 'one'}"], args.steps)
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        two = images_per_s(torchrun, 1, [*data, f"run.url={root / 'two'}"], args.steps)
    print(f"tiny config (ngf 8, 2 blocks, crop 32), batch 1 per rank, {args.steps} steps, CPU, gloo")
    print(f"1 process x 2 threads      : {one:7.2f} images/s")
    print(f"torchrun 2 procs x 1 thread: {two:7.2f} images/s")
    print(f"ratio DDP / single         : {two / one:7.2f}x")


if __name__ == "__main__":
    main()
