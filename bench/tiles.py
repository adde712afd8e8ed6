"""Tiled against whole-image translation: time, peak memory and agreement at 1024², 2048², 4096².

    python -m bench.tiles [--sizes 1024 2048 4096] [--tile 512] [--ngf 16] [--device cpu]

Modes: whole (netG on the whole image), tiled (activations between segments in RAM) and tiled with
spill (activations over 64 MiB in memory-mapped files on local disk, pipeline.spill, as jobs.infer
does past 1/16 of the machine's memory). Each (size, mode) runs in a fresh subprocess so that its
peak memory is its own: on the CPU the peak of the process's anonymous memory (RssAnon sampled
every 5 ms: what it needs for itself, page cache of the spilled files excluded) and its peak
resident set; on a GPU the peak of torch's CUDA allocator. All modes translate the same random image
with the same random resnet_9blocks weights; tiled outputs are compared with the whole-image one
(max |difference| in float32). The input and output images themselves (24 bytes per pixel in
float32) are in every mode's figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from bench.child import run_json

MODES = ("whole", "tiled", "spill")

def anonymous_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler(threading.Thread):
    """The largest RssAnon seen while it runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.running = anonymous_bytes(), True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, anonymous_bytes())
            time.sleep(0.005)


def child(size: int, mode: str, tile: int, ngf: int, device: str, out: str) -> None:
    from cut import ResnetGenerator
    from cut.fast import accelerate
    from cut.networks import init_weights
    from cut.tiling import host_empty, tiled_forward
    from pipeline.spill import SpillArena

    torch.manual_seed(0)
    netG = accelerate(init_weights(ResnetGenerator(ngf=ngf))).eval().to(device)
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    with torch.inference_mode(), tempfile.TemporaryDirectory(prefix="bench-tiles-") as spool:
        if mode == "whole":
            y = netG(x.to(device)).cpu()
        else:
            arena = SpillArena(spool, threshold=64 * 2**20)
            y = tiled_forward(netG, x, tile, device, arena.empty if mode == "spill" else host_empty)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    sampler.running = False
    sampler.join()
    torch.save(y.clone(), out)
    peak_device = torch.cuda.max_memory_allocated() if device == "cuda" else None
    print(json.dumps({"seconds": seconds, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "anon": sampler.peak, "device": peak_device}))


def measure(size: int, mode: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.tiles", "--child", str(size), mode, "--tile", str(args.tile),
           "--ngf", str(args.ngf), "--device", args.device, "--out", str(out)]
    return run_json(cmd)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.tiles", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--tile", type=int, default=512, help="tile edge in network pixels")
    p.add_argument("--ngf", type=int, default=16, help="generator width (64 is the official one)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1], args.tile, args.ngf, args.device, args.out)
        return
    threads = torch.get_num_threads()
    print(f"resnet_9blocks ngf {args.ngf}, {args.device}, {threads} threads, tile {args.tile}")
    key = "device" if args.device == "cuda" else "anon"
    print(f"peak memory: {'torch CUDA allocator' if key == 'device' else 'anonymous (RssAnon)'}, GiB; "
          f"peak resident set in brackets; seconds")
    header = ("size", "mode", "seconds", "peak", "(resident)", "max |diff|")
    print(" ".join(f"{h:>{w}s}" for h, w in zip(header, (6, 7, 8, 8, 11, 11), strict=True)))
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            reference = None
            for mode in MODES:
                result = measure(size, mode, args, Path(tmp) / f"{mode}.pt")
                y = torch.load(Path(tmp) / f"{mode}.pt")
                reference = y if reference is None else reference
                diff = float((y - reference).abs().max())
                print(f"{size:6d} {mode:>7s} {result['seconds']:8.2f} {result[key] / 2**30:8.2f} "
                      f"({result['rss'] / 2**30:8.2f}) {diff:11.2e}")


if __name__ == "__main__":
    main()
