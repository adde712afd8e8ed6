"""Images per second of jobs.infer against a per-image loop like the official test.py, in one run.

    python -m bench.infer [--images 24] [--batch-size 1] [--workers 0]

Both translate the same horse2zebra test images (256x256 JPEGs) with the same generator (default
resnet_9blocks, random weights: speed does not depend on them) at the official preprocessing, and
write PNGs to local disk. The baseline does what test.py does per image: PIL open, bicubic resize
to 256, to tensor, G under no_grad at batch 1, clamp/scale/truncate, PNG save.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cut import ResnetGenerator, export_generator
from cut.checkpoint import to_bytes
from cut.networks import init_weights
from jobs import infer

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "horse2zebra" / "testA"


def official_loop(g: ResnetGenerator, files: list[Path], out: Path) -> float:
    """The per-image path of the official test.py; returns seconds."""
    out.mkdir(parents=True)
    start = time.perf_counter()
    for path in files:
        img = Image.open(path).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
        with torch.no_grad():
            y = g(x[None])[0]
        pixels = ((y.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(out / f"{path.stem}.png")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=1, help="1 is fastest on CPU (cache-bound convs)")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="run the job in channels_last")
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(args.data.glob("*.jpg"))[: args.images]
    torch.manual_seed(0)
    g = init_weights(ResnetGenerator()).eval()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "g.pt").write_bytes(to_bytes(export_generator(g)))
        listing = root / "inputs.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        official_loop(g, files[:1], root / "warmup")
        base = official_loop(g, files, root / "official")
        start = time.perf_counter()
        code = infer.main(
            [
                "--checkpoint",
                str(root / "g.pt"),
                "--input",
                str(listing),
                "--out",
                str(root / "job"),
                "--batch-size",
                str(args.batch_size),
                "--workers",
                str(args.workers),
                "--no-progress",
            ]
            + (["--channels-last"] if args.channels_last else [])
        )
        job = time.perf_counter() - start
        assert code == 0
    n = len(files)
    print(f"torch {torch.__version__}, {args.threads} threads, {n} images at 256x256, resnet_9blocks")
    print(f"official per-image loop : {n / base:7.3f} images/s")
    print(f"jobs.infer (batch {args.batch_size}, {args.workers} workers): {n / job:7.3f} images/s")
    print(f"speedup                 : {base / job:7.2f}x")


if __name__ == "__main__":
    main()
