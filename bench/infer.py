"""Images per second of jobs.infer against the official test.py path and a plain loop, in one run.

    python -m bench.infer [--images 24] [--threads 2]

All three translate the same horse2zebra test images (256x256 JPEGs) with the same weights
(resnet_9blocks, random: speed does not depend on them) at the official preprocessing, and write
PNGs to local disk:
- official test.py path: the official network (`bench.official`: its blur layers, InstanceNorm2d,
  plain convolutions), per image: PIL open, bicubic resize to 256, to tensor, G under no_grad at
  batch 1, clamp/scale/truncate, PNG save at Pillow's default level;
- plain loop: the same loop over our generator;
- jobs.infer: the whole job with its CPU defaults (planning and start-up included).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.official import use_official_layers
from cut import ResnetGenerator, export_generator
from cut.checkpoint import to_bytes
from cut.networks import init_weights
from jobs import infer

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "horse2zebra" / "testA"


def per_image_loop(g: nn.Module, files: list[Path], out: Path) -> float:
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
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=DATA)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(args.data.glob("*.jpg"))[: args.images]
    torch.manual_seed(0)
    g = init_weights(ResnetGenerator()).eval()
    official = copy.deepcopy(g)
    use_official_layers(official)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "g.pt").write_bytes(to_bytes(export_generator(g)))
        listing = root / "inputs.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        per_image_loop(official, files[:1], root / "warm-official")
        per_image_loop(g, files[:1], root / "warm-ours")
        seconds = {
            "official": per_image_loop(official, files, root / "official"),
            "plain": per_image_loop(g, files, root / "plain"),
        }
        start = time.perf_counter()
        argv = ["--checkpoint", str(root / "g.pt"), "--input", str(listing), "--out", str(root / "job")]
        assert infer.main([*argv, "--no-progress"]) == 0
        seconds["job"] = time.perf_counter() - start
    n = len(files)
    rate = {k: n / v for k, v in seconds.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, {n} images at 256x256, resnet_9blocks, PNGs")
    print(f"official test.py path (official network)  : {rate['official']:7.3f} images/s")
    print(f"plain per-image loop over our generator   : {rate['plain']:7.3f} images/s")
    print(f"jobs.infer (CPU defaults, start-up incl.) : {rate['job']:7.3f} images/s")
    print(f"jobs.infer / official test.py path        : {rate['job'] / rate['official']:7.2f}x")
    print(f"jobs.infer / plain loop                   : {rate['job'] / rate['plain']:7.2f}x")


if __name__ == "__main__":
    main()
