"""Seconds per training step and peak memory: our CUT step against the official computation.

    python -m bench.train_step --preset CUT --crop 64 128 256

The baseline, measured in the same run, is the official step as cut-reference.md describes it: keys
re-encoded from real_A and real_B with autograd on (``reuse_keys=False``), the official blur
layers (upsampling as a grouped transposed convolution, downsampling as a depthwise convolution
through plain autograd) and torch's InstanceNorm2d followed by the in-place ReLU.
Each variant runs in fresh processes: one for the
time per step, one for peak memory (max RSS during two steps, above the RSS before the first step;
measured with glibc's mmap threshold lowered so that freed tensors leave the RSS, which would
distort the timing, hence the separate process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from cut import CUTConfig, CUTModel
from cut.networks import Downsample, InstanceNorm, Upsample


class OfficialDownsample(nn.Module):
    """The official blur downsampling, through plain autograd (which saves the padded input)."""

    def __init__(self, filt: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("filt", filt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.filt, stride=2, groups=x.shape[1])


class OfficialUpsample(nn.Module):
    """The official blur upsampling: replicate pad, grouped transposed conv, crop one row/column."""

    def __init__(self, filt: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("filt", filt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv_transpose2d(
            F.pad(x, (1, 1, 1, 1), mode="replicate"), self.filt, stride=2, padding=2, groups=x.shape[1]
        )
        return y[:, :, 1:-1, 1:-1]


def build(variant: str, preset: str, channels_last: bool) -> CUTModel:
    official = variant == "official"
    cfg = CUTConfig.from_preset(preset, reuse_keys=not official, channels_last=channels_last)
    model = CUTModel(cfg, seed=0)
    if official:
        # The official step zeroes gradients before each backward, so every gradient stays resident
        # until the same network's next backward; ours frees them once applied. Keep references alike.
        resident: dict[int, torch.Tensor] = {}
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(lambda p: resident.__setitem__(id(p), p.grad))
        for net in (model.netG, model.netD):
            _use_official_layers(net)
    return model


def _use_official_layers(net: nn.Module) -> None:
    """Swap in the official blur layers and torch's InstanceNorm2d (whose output is a view)."""
    for name, module in list(net.named_children()):
        if isinstance(module, Upsample):
            setattr(net, name, OfficialUpsample(module.filt))
        elif isinstance(module, Downsample):
            setattr(net, name, OfficialDownsample(module.filt))
        elif isinstance(module, InstanceNorm):
            setattr(net, name, nn.InstanceNorm2d(module.num_features))
        else:
            _use_official_layers(module)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(variant: str, preset: str, crop: int, steps: int, channels_last: bool) -> dict[str, float]:
    """Run in this process: one warm-up step, then ``steps`` timed steps; peak RSS growth."""
    torch.manual_seed(0)
    model = build(variant, preset, channels_last)
    a, b = torch.rand(1, 3, crop, crop) * 2 - 1, torch.rand(1, 3, crop, crop) * 2 - 1
    rss_before = _rss_bytes()
    model.train_step(a, b)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model.train_step(a, b)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {"s_per_step": statistics.median(times), "peak_mib": peak / 2**20}


def _child(variant: str, preset: str, crop: int, steps: int, threads: int, cl: bool, env: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.train_step", "--_child", variant, "--preset", preset]
    cmd += ["--crop", str(crop), "--steps", str(steps), "--threads", str(threads)]
    if cl:
        cmd.append("--channels-last")
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_isolated(
    variant: str, preset: str, crop: int, steps: int, threads: int, cl: bool
) -> dict[str, float]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    timed = _child(variant, preset, crop, steps, threads, cl, env)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    timed["peak_mib"] = _child(variant, preset, crop, 1, threads, cl, env)["peak_mib"]
    return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["CUT"], choices=["CUT", "FastCUT"])
    p.add_argument("--crop", nargs="+", type=int, default=[64, 128])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="run our step in channels_last")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        torch.set_num_threads(args.threads)
        cl = args.channels_last and args._child == "ours"
        print(json.dumps(measure(args._child, args.preset[0], args.crop[0], args.steps, cl)))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, {args.steps} timed steps")
    header = f"{'preset':8} {'crop':>5} {'official s':>11} {'ours s':>8} {'speedup':>8}"
    print(header + f" {'official MiB':>13} {'ours MiB':>9} {'mem ratio':>10}")
    for preset in args.preset:
        for crop in args.crop:
            base = run_isolated("official", preset, crop, args.steps, args.threads, False)
            ours = run_isolated("ours", preset, crop, args.steps, args.threads, args.channels_last)
            print(
                f"{preset:8} {crop:5d} {base['s_per_step']:11.3f} {ours['s_per_step']:8.3f} "
                f"{base['s_per_step'] / ours['s_per_step']:7.2f}x {base['peak_mib']:13.0f} "
                f"{ours['peak_mib']:9.0f} {ours['peak_mib'] / base['peak_mib']:9.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
