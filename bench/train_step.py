"""Seconds per training step and peak memory: our CUT step against the official computation.

    python -m bench.train_step --preset CUT --crop 64 128 256

The baseline, measured in the same run, is the official step in docs/official-reference.md §9: keys
re-encoded from real_A and real_B with autograd on (``reuse_keys=False``), the official blur
layers (upsampling as a grouped transposed convolution, downsampling as a depthwise convolution
through plain autograd), torch's InstanceNorm2d followed by the in-place ReLU, nn.Conv2d (no
Winograd) in the ResNet blocks and torch's default (unfused) Adam.
Time per step: the fastest of ``--rounds`` x ``--steps`` steps per variant, in processes that
alternate official and ours. On a shared machine other tenants only ever add time, by up to 20%
over minutes, more than some differences measured; the fastest step is the least disturbed one.
The median is printed too.
Peak memory: a fresh process per variant (max RSS during two steps, above the RSS before the first
step; measured with glibc's mmap threshold lowered so that freed tensors leave the RSS, which would
distort the timing, hence the separate processes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch

from bench.child import run_json
from bench.official import use_official_layers
from cut import CUTConfig, CUTModel


def build(variant: str, preset: str, channels_last: bool, device: str | torch.device = "cpu",
          bf16: bool = False, **arch: int) -> CUTModel:
    """Our CUT model, or (`variant` "official") the official step: keys re-encoded, the official
    network (`bench.official`), torch's default Adam, gradients kept until the next backward.
    ``arch`` overrides the preset's widths and depth (ngf, ndf, n_blocks)."""
    official = variant == "official"
    cfg = CUTConfig.from_preset(preset, reuse_keys=not official, channels_last=channels_last, bf16=bf16,
                                **arch)
    model = CUTModel(cfg, device=device, seed=0)
    if official:
        # torch's default Adam (a per-tensor loop on the CPU), as the official code constructs it.
        adam = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}
        model.opt_G = torch.optim.Adam(model.netG.parameters(), **adam)
        model.opt_D = torch.optim.Adam(model.netD.parameters(), **adam)
        model.opt_F = torch.optim.Adam(model.netF.parameters(), **adam)
        # The official step zeroes gradients before each backward, so every gradient stays resident
        # until the same network's next backward; ours frees them once applied. Keep references alike.
        resident: dict[int, torch.Tensor] = {}
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: resident.__setitem__(id(p), p.grad))
        for net in (model.netG, model.netD):
            use_official_layers(net)
    return model


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _inputs(crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(1, 3, crop, crop) * 2 - 1, torch.rand(1, 3, crop, crop) * 2 - 1


def time_steps(variant: str, preset: str, crop: int, steps: int, channels_last: bool) -> list[float]:
    """Seconds of each of ``steps`` steps after a warm-up step, this variant alone in the process."""
    torch.manual_seed(0)
    model = build(variant, preset, channels_last)
    a, b = _inputs(crop)
    model.train_step(a, b)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_step(a, b)
        times.append(time.perf_counter() - t0)
    return times


def peak_memory(variant: str, preset: str, crop: int, channels_last: bool) -> float:
    """MiB of RSS growth over a warm-up step and one more step, this variant alone in the process."""
    torch.manual_seed(0)
    model = build(variant, preset, channels_last)
    a, b = _inputs(crop)
    rss_before = _rss_bytes()
    model.train_step(a, b)
    model.train_step(a, b)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before) / 2**20


def _child(args: list[str], threads: int, low_mmap_threshold: bool = False) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if low_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    cmd = [sys.executable, "-m", "bench.train_step", *args, "--threads", str(threads)]
    return run_json(cmd, env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["CUT"], choices=["CUT", "FastCUT"])
    p.add_argument("--crop", nargs="+", type=int, default=[64, 128])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="run our step in channels_last")
    p.add_argument("--rounds", type=int, default=2, help="alternating processes per variant")
    p.add_argument("--_time", choices=["official", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--_memory", choices=["official", "ours"], help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    preset, crop, cl = args.preset[0], args.crop[0], args.channels_last
    if args._time:
        times = time_steps(args._time, preset, crop, args.steps, cl and args._time == "ours")
        print(json.dumps({"times": times}))
        return
    if args._memory:
        peak = peak_memory(args._memory, preset, crop, cl and args._memory == "ours")
        print(json.dumps({"peak_mib": peak}))
        return
    runs = f"fastest (median) of {args.rounds} x {args.steps} steps in alternating processes"
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, {runs}")
    header = f"{'preset':8} {'crop':>5} {'official s':>11} {'ours s':>8} {'speedup':>8} {'(median)':>9}"
    print(header + f" {'official MiB':>13} {'ours MiB':>9} {'mem ratio':>10}")
    for preset in args.preset:
        for crop in args.crop:
            common = ["--preset", preset, "--crop", str(crop)]
            common += ["--channels-last"] if args.channels_last else []
            times: dict[str, list[float]] = {"official": [], "ours": []}
            for _ in range(args.rounds):  # alternate, so drifting machine load hits both alike
                for v in times:
                    run = _child([*common, "--steps", str(args.steps), "--_time", v], args.threads)
                    times[v] += run["times"]
            secs = {v: min(ts) for v, ts in times.items()}
            medians = {v: statistics.median(ts) for v, ts in times.items()}
            mem = {
                v: _child([*common, "--_memory", v], args.threads, low_mmap_threshold=True)["peak_mib"]
                for v in ("official", "ours")
            }
            print(
                f"{preset:8} {crop:5d} {secs['official']:11.3f} {secs['ours']:8.3f} "
                f"{secs['official'] / secs['ours']:7.2f}x {medians['official'] / medians['ours']:8.2f}x "
                f"{mem['official']:13.0f} "
                f"{mem['ours']:9.0f} {mem['ours'] / mem['official']:9.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
