"""The prepared device check: run it once when a task has a GPU; every GPU figure we track, in one run.

    python -m bench.gpu_check [--compile]            # on a CUDA device, about 6-8 minutes
    python -m bench.gpu_check --smoke                 # the same code paths on the CPU, tiny (a test):
                                                      # 32x32 images, narrow networks, one or two runs each

1. Correctness in bf16: the generator under bf16 autocast + channels_last against fp32, and three
   CUT training steps in bf16 against fp32 from the same weights.
2. GPU-only rate: the generator on device-resident uint8 batches (scaled on the device, outputs
   quantised on the device, no host copies) at 256x256: fp32, bf16, bf16 + channels_last (+
   torch.compile), at the job's batch size and at 64.
3. End to end: jobs.infer (the real job: plan, DataLoader workers, uint8 transfer, encode threads,
   PNG files, manifest) on generated 256x256 JPEGs in bf16 + channels_last (+ compile); the steady
   rate (from the first committed unit on), its ratio to the GPU-only rate, and the host's CPU
   time per image by stage. Goals: at least 3,000 images/s on one H200, within 80% of GPU-only.
4. Training: jobs.train on generated shard sets, data_wait at batch 1 and at the largest batch whose
   step fits on the device (probed by doubling from 8 up to 128; goal: under 5%), and
   the CUT and FastCUT steps against the official step (bench.official's network, keys re-encoded,
   torch's default Adam), bf16 + channels_last for ours (goal: 3x).
Prints one JSON line per measurement, so the output can be kept as a record.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from bench.train_step import build
from cut import CUTConfig, CUTModel, ResnetGenerator, export_generator
from cut.checkpoint import to_bytes
from cut.fast import accelerate
from cut.inference import from_uint8, is_out_of_memory, to_uint8
from cut.networks import init_weights

ROOT = Path(__file__).resolve().parent.parent
#: The networks' width and depth: the official ones, or (--smoke) narrow ones, since the smoke run
#: checks that every path runs, not its speed.
ARCH: dict[str, int] = {}


def record(**fields) -> None:
    print(json.dumps(fields), flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, seconds: float, device: torch.device, warmup: int = 3) -> float:
    """Calls per second of ``fn`` over about ``seconds`` after a warm-up, synchronising the device."""
    for _ in range(warmup):
        fn()
    _sync(device)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 2:
        fn()
        calls += 1
    _sync(device)
    return calls / (time.perf_counter() - start)


def _generator() -> ResnetGenerator:
    """The CUT generator at the check's width and depth (`ARCH`)."""
    return ResnetGenerator(**{k: v for k, v in ARCH.items() if k in ("ngf", "n_blocks")})


def check_correctness(device: torch.device, size: int, images: int = 4, steps: int = 3) -> None:
    torch.manual_seed(0)
    g = accelerate(init_weights(_generator(), gain=0.5)).to(device).eval()
    x = torch.rand(images, 3, size, size, device=device) * 2 - 1
    with torch.inference_mode():
        ref = g(x)
        g_cl = g.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = g_cl(x.contiguous(memory_format=torch.channels_last)).float()
    diff = (low - ref).abs()
    record(check="generator bf16 vs fp32", max_abs=diff.max().item(), mean_abs=diff.mean().item())
    a, b = torch.rand(1, 3, size, size) * 2 - 1, torch.rand(1, 3, size, size) * 2 - 1
    runs = {}
    for name, extra in (("fp32", {}), ("bf16", {"bf16": True, "channels_last": True})):
        model = CUTModel(CUTConfig.from_preset("CUT", **extra, **ARCH), device=device, seed=0)
        runs[name] = [model.train_step(a.to(device), b.to(device)) for _ in range(steps)]
    for step, (f, h) in enumerate(zip(runs["fp32"], runs["bf16"], strict=True)):
        record(check="CUT step bf16 vs fp32", step=step, **{k: [round(f[k], 4), round(h[k], 4)] for k in f})


def gpu_only_rates(device: torch.device, size: int, batches: list[int], seconds: float,
                   compile_too: bool, warmup: int = 3) -> dict[str, float]:
    """Images/s of the generator on device-resident uint8 batches, per variant and batch."""
    torch.manual_seed(0)
    variants = [("fp32", False, False, False), ("bf16", True, False, False), ("bf16+cl", True, True, False)]
    if compile_too:
        variants.append(("bf16+cl+compile", True, True, True))
    rates = {}
    for name, bf16, cl, comp in variants:
        g = accelerate(_generator()).to(device).eval()
        if cl:
            g = g.to(memory_format=torch.channels_last)
        fn = torch.compile(g) if comp else g
        for batch in batches:
            x8 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

            def run(fn=fn, x8=x8, bf16=bf16, cl=cl):
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    x = from_uint8(x8)
                    x = x.contiguous(memory_format=torch.channels_last) if cl else x
                    to_uint8(fn(x))

            rate = _timed(run, seconds, device, warmup) * batch
            rates[f"{name}@{batch}"] = rate
            record(bench=f"GPU-only {size}x{size}", variant=name, batch=batch, images_per_s=round(rate, 1))
    return rates


def _write_jpeg(args: tuple[Path, int, int]) -> None:
    from PIL import Image

    path, seed, size = args
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)


def synthetic_jpegs(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """`n` smooth random JPEGs (photograph-like to a decoder and an encoder), written in parallel."""
    folder.mkdir(parents=True)
    paths = [folder / f"img-{i:06d}.jpg" for i in range(n)]
    with ProcessPoolExecutor(max(1, (os.cpu_count() or 2) - 1)) as pool:
        list(pool.map(_write_jpeg, [(p, seed + i, size) for i, p in enumerate(paths)], chunksize=64))
    return paths


def end_to_end(device: torch.device, root: Path, size: int, images: int, batch: int, compile_too: bool,
               gpu_rate: float | None) -> None:
    """The steady rate of the real job, from its first committed unit to its last."""
    from jobs import infer
    from jobs.translator import Translator
    from pipeline.plan import worker_units
    from pipeline.planner import obtain_plan

    folder = root / "infer-in"
    synthetic_jpegs(folder, images, size)
    ckpt = root / "g.pt"
    torch.manual_seed(0)
    ckpt.write_bytes(to_bytes(export_generator(init_weights(_generator()), preset="CUT")))
    unit = max(batch, images // 16)
    argv = ["--checkpoint", str(ckpt), "--input", str(folder), "--out", str(root / "infer-out"),
            "--device", device.type, "--crop-size", str(size), "--batch-size", str(batch),
            "--unit-size", str(unit), "--no-progress"] + ["--compile"] * compile_too
    if device.type == "cuda":
        argv += ["--bf16", "--channels-last"]
    config = infer.load_infer_config(infer.build_parser().parse_args(argv))
    translator = Translator(config)
    commits: list[tuple[float, int]] = []
    commit = translator._commit

    def timed_commit(unit, state, errors) -> None:
        commit(unit, state, errors)
        commits.append((time.perf_counter(), len(state.writes) + len(state.rows) + len(errors)))

    translator._commit = timed_commit
    plan = obtain_plan(config.out, config.inputs, infer.job_identity(config, translator.model_sha256),
                       config.unit_size, worker=0)
    translator.run(worker_units(plan, 0, 1))
    assert translator.stats == {"ok": images, "error": 0}, translator.stats
    steady = sum(n for _, n in commits[1:]) / max(commits[-1][0] - commits[0][0], 1e-9)
    variant = ("bf16+cl" if config.bf16 else "fp32") + "+compile" * compile_too
    fields = {
        "bench": f"jobs.infer end to end {size}x{size}", "variant": variant, "batch": batch,
        "workers": config.workers, "encode_threads": config.encode_threads, "images": images,
        "steady_images_per_s": round(steady, 1),
        "whole_run_images_per_s": round(images / translator.elapsed, 1),
        "host_cpu_ms_per_image": {k: round(1000 * v / images, 3) for k, v in translator.seconds.items()},
    }
    if gpu_rate:
        fields["of_gpu_only"] = round(steady / gpu_rate, 3)
    record(**fields)


def _shard_set(root: Path, name: str, n: int, size: int, seed: int) -> Path:
    from pipeline.ingest import build_shards

    synthetic_jpegs(root / f"{name}-images", n, size, seed)
    build_shards([str(root / f"{name}-images")], str(root / name), prefix=name, progress=False)
    return root / name


def training_data_wait(device: torch.device, root: Path, size: int, steps: int, batches: list[int],
                       images: int = 256, overrides: tuple[str, ...] = ()) -> None:
    """jobs.train's own data_wait figure (its log lines) at each batch size, after the first log;
    larger batches run fewer steps (about the images of 8 batch-1 runs, at least 8 steps)."""
    a = _shard_set(root, "trainA", images, size, 1)
    b = _shard_set(root, "trainB", images, size, 2)
    for batch in batches:
        steps_here = steps if batch == 1 else max(8, 8 * steps // batch)
        log_every = max(1, steps_here // 4)
        cmd = [sys.executable, "-m", "jobs.train", "--config", "configs/cut.yaml", f"data.a={a}",
               f"data.b={b}", f"run.url={root / f'run-{batch}'}", f"train.batch_size={batch}",
               f"train.max_steps={steps_here}", f"train.log_every={log_every}",
               "train.checkpoint_every=1000000", "train.image_every=1000000", f"train.device={device.type}",
               f"data.load_size={size + size // 8}", f"data.crop_size={size}", *overrides]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            record(bench="jobs.train data_wait", batch=batch, error=done.stderr[-2000:])
            continue
        found = re.findall(r"images/s=([\d.]+) data_wait=(\d+)%", done.stderr + done.stdout)
        rates, waits = [float(r) for r, _ in found[1:]], [int(w) for _, w in found[1:]]
        record(bench="jobs.train data_wait", batch=batch, size=size, steps=steps_here,
               data_wait_percent=waits, images_per_s=rates)


def largest_training_batch(device: torch.device, size: int, candidates: list[int]) -> int:
    """The largest of ``candidates`` (ascending) at which two CUT steps run without running out of
    device memory, in the precision jobs.train uses there (bf16 + channels_last on CUDA)."""
    on_device = device.type == "cuda"
    fits = 1
    for batch in candidates:
        model = None
        try:
            model = build("ours", "CUT", channels_last=on_device, device=device, bf16=on_device, **ARCH)
            a, b = (torch.rand(batch, 3, size, size, device=device) * 2 - 1 for _ in range(2))
            for _ in range(2):
                model.train_step(a, b, sync=False)
            _sync(device)
            fits = batch
        except RuntimeError as exc:  # torch.OutOfMemoryError, or cuDNN's/cuBLAS's allocation failure
            if not is_out_of_memory(exc):
                raise
            break
        finally:
            del model
            if on_device:
                torch.cuda.empty_cache()
    record(bench="largest training batch", size=size, batch=fits, tried=candidates)
    return fits


def training_speed(device: torch.device, size: int, seconds: float) -> None:
    """Our train step (bf16 + channels_last) against the official step on the same device."""
    a, b = (torch.rand(1, 3, size, size, device=device) * 2 - 1 for _ in range(2))
    on_device = device.type == "cuda"
    for preset in ("CUT", "FastCUT"):
        rates = {}
        for variant in ("official", "ours"):
            torch.manual_seed(0)
            fast = variant == "ours" and on_device
            model = build(variant, preset, channels_last=fast, device=device, bf16=fast, **ARCH)
            rates[variant] = _timed(lambda m=model: m.train_step(a, b, sync=False), seconds, device)
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_device else None
            record(bench=f"train step {size}", preset=preset, variant=variant,
                   s_per_step=round(1 / rates[variant], 4), peak_gib=None if peak is None else round(peak, 2))
        record(bench=f"train step {size}", preset=preset, speedup=round(rates["ours"] / rates["official"], 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compile", action="store_true", help="also measure torch.compile variants")
    p.add_argument("--seconds", type=float, default=5.0, help="per speed measurement")
    p.add_argument("--images", type=int, default=16384, help="inputs of the end-to-end run")
    p.add_argument("--batch", type=int, default=16, help="the job's batch size (its CUDA default)")
    p.add_argument("--train-steps", type=int, default=100)
    p.add_argument("--smoke", action="store_true", help="tiny, on the CPU: checks the script, not speed")
    args = p.parse_args()
    if args.smoke:  # bf16 on a CPU without bf16 instructions is slow: each path runs as few times as it can
        device, size = torch.device("cpu"), 32
        args.seconds, args.images, args.batch, args.train_steps = 0.01, 32, 2, 2
        ARCH.update(ngf=8, ndf=8, n_blocks=2)
        torch.set_num_threads(2)
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this check is for a lent GPU (--smoke runs it on the CPU)")
    else:
        device, size = torch.device("cuda"), 256
        torch.backends.cudnn.benchmark = True
    record(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
           cores=os.cpu_count())
    start = time.perf_counter()
    check_correctness(device, size, *((1, 2) if args.smoke else ()))
    rates = gpu_only_rates(device, size, sorted({args.batch, 64 if not args.smoke else 2}), args.seconds,
                           args.compile, warmup=1 if args.smoke else 3)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for comp in [False] + [True] * args.compile:
            key = f"{'bf16+cl+compile' if comp else 'bf16+cl'}@{args.batch}"
            end_to_end(device, root / f"e2e-{comp}", size, args.images, args.batch, comp, rates.get(key))
        largest = largest_training_batch(device, size, [2] if args.smoke else [8, 16, 32, 64, 128])
        narrow = tuple(f"model.{k}={v}" for k, v in ARCH.items())
        smoke = {"images": 16, "overrides": narrow} if args.smoke else {}
        training_data_wait(device, root, size, args.train_steps, sorted({1, largest}), **smoke)
    training_speed(device, size, args.seconds)
    record(done=True, seconds=round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
