"""Images per second of jobs.infer against the official test.py path and a plain loop, in one run.

    python -m bench.infer [--images 24] [--threads 2] [--rounds 3] [--executor ray] [--only job,ray]

All three translate the same horse2zebra test images (256x256 JPEGs) with the same weights
(resnet_9blocks, random: speed does not depend on them) at the official preprocessing, and write
PNGs to local disk:
- official test.py path: what the official test.py does per test image, on the official network
  (`bench.official`: its blur layers, InstanceNorm2d, plain convolutions): its unaligned test set
  loads an A and a B image (PIL open, RGB, bicubic resize to 256, to tensor, normalise), G runs on A
  under no_grad at batch 1, and every visual of the CUT model (real_A, fake_B, real_B) is converted
  as its tensor2im does (clamp, numpy, (x + 1) / 2 * 255, truncate) and saved as a PNG at Pillow's
  default level;
- plain loop: A alone through our generator, fake_B saved the same way;
- jobs.infer: the whole job with its CPU defaults (planning and start-up included);
- jobs.infer --engine onnxruntime: the same job on an ONNX export of the same weights (jobs.export,
  made and verified before the timed runs), run by onnxruntime's CPU execution provider;
- with --executor ray, also jobs.infer --executor ray: the same job as a Ray Data pipeline on a local
  Ray instance (`bench.ray_local`) that is started once before the timed rounds and that every run
  joins with --ray-address; starting the instance (printed) is charged to no run, as a cluster that
  is already up costs a job nothing. Its rate is printed beside the local executor's, with the ratio
  (the goal: ray within 15% of local, a ratio of at least 0.85), and split into a 1-image job's time
  (what a job pays once) and the time per image beyond it (the rate a long job approaches).

Every timed run is a fresh process, as a user's would be (so no variant inherits another's
allocator or thread-pool state: jobs.infer tunes its process's malloc, `jobs.runtime`), after one
warm-up image through the same path in that process; the variants alternate round by round and
the fastest run of each counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from bench.child import run_json
from bench.official import use_official_layers
from bench.ray_local import LocalRay, local_ray
from cut import ResnetGenerator, export_generator
from cut.checkpoint import to_bytes
from cut.fast import accelerate
from cut.networks import init_weights
from jobs import export, infer

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "horse2zebra" / "testA"


def _load(path: Path) -> torch.Tensor:
    img = Image.open(path).convert("RGB").resize((256, 256), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img)).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)[None]


def _save(x: torch.Tensor, path: Path) -> None:
    pixels = (np.transpose(x[0].clamp(-1, 1).cpu().float().numpy(), (1, 2, 0)) + 1) / 2.0 * 255.0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


def official_test_path(g: nn.Module, files: list[Path], b_files: list[Path], out: Path) -> float:
    """The official test.py's work per test image (see the module docstring); returns seconds."""
    start = time.perf_counter()
    for i, path in enumerate(files):
        real_a, real_b = _load(path), _load(b_files[i % len(b_files)])
        with torch.no_grad():
            fake_b = g(real_a)
        for label, x in (("real_A", real_a), ("fake_B", fake_b), ("real_B", real_b)):
            _save(x, out / label / f"{path.stem}.png")
    return time.perf_counter() - start


def plain_loop(g: nn.Module, files: list[Path], out: Path) -> float:
    """A per-image loop over our generator: load, translate, save; returns seconds."""
    start = time.perf_counter()
    for path in files:
        with torch.no_grad():
            y = g(_load(path))
        _save(y, out / f"{path.stem}.png")
    return time.perf_counter() - start


def _generator() -> nn.Module:
    """The benchmark's weights: random, the same in every process."""
    torch.manual_seed(0)
    return accelerate(init_weights(ResnetGenerator())).eval()


def _job(argv: list[str]) -> float:
    start = time.perf_counter()
    assert infer.main(argv) == 0
    return time.perf_counter() - start


def timed_run(variant: str, files: list[Path], root: Path, out: Path, ray_address: str | None = None
              ) -> tuple[float, float | None]:
    """Seconds of one variant over ``files`` in this process, after one warm-up image; and, for the
    jobs, the seconds of the warm-up job (one image: mostly the job's fixed cost)."""
    if variant in ("official", "plain"):
        g = _generator()
        if variant == "official":
            use_official_layers(g)
            b_files = sorted((files[0].parent.parent / "testB").glob("*.jpg"))
            official_test_path(g, files[:1], b_files, out / "warm-up")
            return official_test_path(g, files, b_files, out / "timed"), None
        plain_loop(g, files[:1], out / "warm-up")
        return plain_loop(g, files, out / "timed"), None
    engine = {"job": ["--checkpoint", str(root / "g.pt")],
              "onnx": ["--checkpoint", str(root / "onnx"), "--engine", "onnxruntime"],
              "ray": ["--checkpoint", str(root / "g.pt"), "--executor", "ray", "--ray-address", ray_address],
              }[variant]
    seconds = []
    for name, inputs in (("warm-up", files[:1]), ("timed", files)):
        listing = out / f"{name}.txt"
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{f}\n" for f in inputs))
        seconds.append(_job([*engine, "--input", str(listing), "--no-progress", "--out", str(out / name)]))
    return seconds[1], seconds[0]


def _break_even(start: dict[str, float], per: dict[str, float], ratio: float) -> str:
    """The job size (images) from which the Ray executor's rate is at least ``ratio`` of the local
    one, given each executor's 1-image job time and time per further image."""
    gain = per["job"] - ratio * per["ray"]  # what each further image brings the ratio
    need = ratio * start["ray"] - start["job"]  # the fixed costs' gap, at that ratio
    if need <= 0:
        return "a 1-image job"
    if gain <= 0:
        return "no job size (its time per image is too high)"
    return f"jobs of {1 + math.ceil(need / gain)} images"


def _child(variant: str, args: argparse.Namespace, root: Path, out: Path, ray: LocalRay | None) -> dict:
    cmd = [sys.executable, "-m", "bench.infer", "--_run", variant, "--_root", str(root), "--_out", str(out),
           "--images", str(args.images), "--threads", str(args.threads), "--data", str(args.data)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    if variant == "ray":
        cmd += ["--_ray_address", ray.address]
        env.update(ray.env)
    return run_json(cmd, env)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating runs of each; the fastest counts")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="ray: also jobs.infer --executor ray on a local Ray instance, beside the local one")
    p.add_argument("--ray-cpus", type=int, default=None,
                   help="CPU slots of the local Ray instance (default: --threads + 1: the executor gives its "
                        "CPU actor every slot but one, left to the read and write tasks, so the model runs "
                        "--threads threads as the local executor's does)")
    p.add_argument("--only", default=None,
                   help="comma-separated variants to run (official, plain, job, onnx, ray); default: all "
                        "(ray with --executor ray)")
    p.add_argument("--_run", choices=["official", "plain", "job", "onnx", "ray"], help=argparse.SUPPRESS)
    p.add_argument("--_root", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_ray_address", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    files = sorted(args.data.glob("*.jpg"))[: args.images]
    if args._run:
        seconds, warm_up = timed_run(args._run, files, args._root, args._out, args._ray_address)
        print(json.dumps({"seconds": seconds, "warm_up": warm_up}))
        return
    variants = ["official", "plain", "job", "onnx"] + (["ray"] if args.executor == "ray" else [])
    if args.only:
        unknown = set(args.only.split(",")) - set(variants)
        if unknown:
            p.error(f"--only: {', '.join(sorted(unknown))} not among {', '.join(variants)}")
        variants = [v for v in variants if v in args.only.split(",")]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        (root / "g.pt").write_bytes(to_bytes(export_generator(_generator())))
        if "onnx" in variants:
            export.export(str(root / "g.pt"), str(root / "onnx"), "onnx")
        ray = None
        if args.executor == "ray":  # started once, outside every timed run; its workers inherit this env
            ray_env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
            ray = stack.enter_context(local_ray(args.ray_cpus or args.threads + 1, ray_env))
        runs_of: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):  # alternate, so drifting machine load hits all variants alike
            for variant, runs in runs_of.items():
                runs.append(_child(variant, args, root, root / f"{variant}-{r}", ray))
    seconds = {k: [run["seconds"] for run in v] for k, v in runs_of.items()}
    n = len(files)
    rate = {k: n / min(v) for k, v in seconds.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, {n} images at 256x256, resnet_9blocks, PNGs, "
          f"fastest of {args.rounds} alternating runs, each in a fresh process after one warm-up image")
    labels = {"official": "official test.py path (official network)  ",
              "plain": "plain per-image loop over our generator   ",
              "job": "jobs.infer (CPU defaults, start-up incl.) ",
              "onnx": "jobs.infer --engine onnxruntime           "}
    for variant, label in labels.items():
        if variant in rate:
            print(f"{label}: {rate[variant]:7.3f} images/s")
    for a, b, label in (("job", "official", "jobs.infer / official test.py path        "),
                        ("job", "plain", "jobs.infer / plain loop                   "),
                        ("onnx", "job", "onnxruntime engine / torch engine         ")):
        if a in rate and b in rate:
            print(f"{label}: {rate[a] / rate[b]:7.2f}x")
    if ray is not None and {"job", "ray"} <= rate.keys():
        slots = args.ray_cpus or args.threads + 1
        print(f"jobs.infer --executor ray (local Ray)     : {rate['ray']:7.3f} images/s  ({slots} CPU slots; "
              f"the instance's start, {ray.start_seconds:.1f} s, is charged to no run)")
        ratio = rate["ray"] / rate["job"]
        print(f"ray executor / local executor             : {ratio:7.2f}x  (goal: at least 0.85)")
        start = {k: min(run["warm_up"] for run in runs_of[k]) for k in ("job", "ray")}
        print(f"a 1-image job (the warm-up; mostly fixed cost): local {start['job']:.1f} s, ray "
              f"{start['ray']:.1f} s (joining the instance, starting the actor, loading the model)")
        if n > 1:  # what each image beyond the first costs: the rate a long job approaches
            per = {k: (min(seconds[k]) - start[k]) / (n - 1) for k in ("job", "ray")}
            print(f"per image beyond a 1-image job: local {per['job']:.3f} s, ray {per['ray']:.3f} s "
                  f"(ray / local rate {per['job'] / per['ray']:.2f}x)")
            print(f"ray within 15% of local from: {_break_even(start, per, 0.85)}")


if __name__ == "__main__":
    main()
