"""Tiled against whole-image translation: time, peak memory and agreement at 1024², 2048², 4096².

    python -m bench.tiles [--sizes 1024 2048 4096] [--tile 512] [--ngf 16] [--device cpu]

Each (size, mode) runs in a fresh subprocess so that its peak memory is its own: the process's peak
resident set on the CPU, the peak of torch's CUDA allocator on a GPU (the figure tiling bounds).
Both modes translate the same random image with the same random resnet_9blocks weights; the
tiled output is compared with the whole-image one in the same run (max |difference| in float32).
On the CPU the activations between segments live in the same RAM as the tiles, so the resident set
there grows with the image in both modes; the device figure is the one that stays flat.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def child(size: int, tile: int, ngf: int, device: str, out: str) -> None:
    from cut import ResnetGenerator
    from cut.networks import init_weights
    from cut.tiling import tiled_forward

    torch.manual_seed(0)
    netG = init_weights(ResnetGenerator(ngf=ngf)).eval().to(device)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.inference_mode():
        y = tiled_forward(netG, x, tile, device) if tile else netG(x.to(device)).cpu()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    torch.save(y, out)
    peak_device = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(json.dumps({"seconds": seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "device": peak_device}))


def measure(size: int, tile: int, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.tiles", "--child", str(size), str(tile), "--ngf", str(args.ngf),
           "--device", args.device, "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tile", type=int, default=512, help="tile edge in network pixels")
    p.add_argument("--ngf", type=int, default=16, help="generator width (64 is the official one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, args.ngf, args.device, args.out)
        return
    threads = torch.get_num_threads()
    print(f"resnet_9blocks ngf {args.ngf}, {args.device}, {threads} threads, tile {args.tile}")
    header = ("size", "whole s", "tiled s", "whole peak", "tiled peak", "max |diff|")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(header, (6, 9, 9, 11, 11, 11), strict=True)))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            whole = measure(size, 0, args, Path(tmp) / "whole.pt")
            tiled = measure(size, args.tile, args, Path(tmp) / "tiled.pt")
            outputs = [torch.load(Path(tmp) / f"{mode}.pt") for mode in ("whole", "tiled")]
            diff = float((outputs[0] - outputs[1]).abs().max())
            key = "device" if args.device == "cuda" else "rss"
            print(f"{size:6d} {whole['seconds']:9.2f} {tiled['seconds']:9.2f} {whole[key] / 2**30:9.2f}Gi "
                  f"{tiled[key] / 2**30:9.2f}Gi {diff:11.2e}")


if __name__ == "__main__":
    main()
