"""The whole system end to end on a laptop CPU: make data, shard it, train with torchrun, translate, score.

    make demo                      # generated shapes: flat dark shapes (A) to striped shapes (B)
    make demo DATA=path/to/set     # a folder with trainA/, trainB/, testA/, testB/ (e.g. horse2zebra)

Every step runs the real command line a user would type; the output lands in demo-out/:
report.html (a gallery of inputs beside their translations and a row of real B images, with the
scores of the translation against the identity baseline, the inputs returned unchanged) and
metrics.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jobs.cli import HelpFormatter, run_job

STRIPE_PERIOD = 4  # pixels: 2 black, 2 grey; fine enough to average out in the content score's scales
STRIPE_GREY = 160


def _shape_box(rng: np.random.Generator, size: int) -> tuple[bool, tuple[int, int, int, int]]:
    w, h = (int(v) for v in rng.integers(size // 4, size // 2, 2))
    x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
    return bool(rng.random() < 0.5), (x0, y0, x0 + w, y0 + h)


def _draw(img: Image.Image, ellipse: bool, box: tuple[int, int, int, int], fill) -> None:
    draw = ImageDraw.Draw(img)
    (draw.ellipse if ellipse else draw.rectangle)(box, fill=fill)


def shapes_image(rng: np.random.Generator, size: int, domain: str) -> Image.Image:
    """One or two shapes on a smooth light background: flat dark colours in A, black and grey
    stripes in B. The background is textured so that PatchNCE has patches to tell apart."""
    colours = rng.integers(170, 256, (3, 3, 3)).astype(np.uint8)
    img = Image.fromarray(colours).resize((size, size), Image.Resampling.BICUBIC)
    rows = np.arange(size)[:, None] // (STRIPE_PERIOD // 2) % 2 * STRIPE_GREY
    stripes = Image.fromarray(rows.repeat(size, 1).astype(np.uint8)).convert("RGB")
    for _ in range(int(rng.integers(1, 3))):
        ellipse, box = _shape_box(rng, size)
        if domain == "A":
            _draw(img, ellipse, box, tuple(int(v) for v in rng.integers(0, 110, 3)))
        else:
            mask = Image.new("L", (size, size), 0)
            _draw(mask, ellipse, box, 255)
            img.paste(stripes, (0, 0), mask)
    return img


def make_shapes(root: Path, per_domain: int, size: int = 64, seed: int = 0, test_count: int = 16) -> None:
    """trainA/, trainB/ (``per_domain`` images each), testA/, testB/ (``test_count``) of PNGs:
    domain A flat dark shapes, domain B the same kind of shapes in stripes."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_domain), ("test", test_count)):
        for domain in ("A", "B"):
            folder = root / f"{split}{domain}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shapes_image(rng, size, domain).save(folder / f"{domain.lower()}-{i:04d}.png")


DEMO_CONFIG = "configs/demo.yaml"
SIZE = 64  # generated images, training crop and evaluation size
REAL_DATA_NOTE = (
    "A CPU demo on real photographs trains a narrow network for a few minutes at 64 px: expect colour "
    "shifts and faint textures, not the paper's results. Those take the official configuration "
    "(configs/cut.yaml: 256 px, 400 epochs of 1,334 steps on horse2zebra, about 530,000 steps): "
    "hours on a GPU."
)


def run(cmd: list[str], threads: int | None = None) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    subprocess.run(cmd, check=True, env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.demo", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("DATA") or None,
        help="folder with trainA/, trainB/, testA/ and testB/ (also DATA=...); default: generated shapes",
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("DEMO_OUT", "demo-out"),
        help="output folder, emptied first (also DEMO_OUT=...)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=int(os.environ.get("DEMO_STEPS", "1500")),
        help="training steps (also DEMO_STEPS=...)",
    )
    parser.add_argument("--ranks", type=int, default=1, help="torchrun processes (gloo on the CPU), each "
                        "given its share of the cores, or OMP_NUM_THREADS threads where that is set")
    return parser


def shard_commands(py: str, data: Path, out: Path) -> list[list[str]]:
    return [
        [py, "-m", "jobs.shard", str(data / f"train{d}"), "--out", str(out / "shards" / d), "--prefix",
         f"train{d}", "--domain", d, "--max-count", "64", "--no-progress"]
        for d in ("A", "B")
    ]


def train_command(py: str, out: Path, ranks: int, steps: int, real_data: bool) -> list[str]:
    sizes = ["data.load_size=72"] if real_data else []  # photographs: random 64 px crops of 72 px
    return [
        py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "jobs.train",
        "--config", DEMO_CONFIG, f"data.a={out / 'shards' / 'A'}", f"data.b={out / 'shards' / 'B'}",
        f"run.url={out / 'run'}", f"train.max_steps={steps}", *sizes,
    ]


def summary(metrics: dict, out: Path, steps: int, seconds: float) -> str:
    keys = ("translation_score", "content_score", "domain_score")
    lines = [f"demo finished in {seconds:.0f} s ({steps} training steps)",
             f"  {'':24s}{'translated':>12s}{'identity':>12s}"]
    for key in keys:
        mine, base = metrics.get(key), metrics.get(f"identity_{key}")
        lines.append(f"  {key:24s}{_fmt(mine):>12s}{_fmt(base):>12s}")
    if metrics.get("domain_saturated"):
        lines.append("  the domain score is saturated (every output has P(B) >= 0.99): it ranks nothing, "
                     "and the translation score is the content score (the report explains)")
    lines += [
        f"  report (open in a browser): {out / 'report.html'}",
        f"  metrics                   : {out / 'metrics.json'}",
        f"  translated images         : {out / 'translated' / 'images'}",
        f"  manifest (Parquet)        : {out / 'translated' / 'manifest'}",
        f"  TensorBoard logs          : {out / 'run' / 'tb'}   (tensorboard --logdir {out / 'run' / 'tb'})",
    ]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = Path(args.data).resolve() if args.data else out / "data"
    if args.data:
        print(REAL_DATA_NOTE)
    else:
        print(f"generating a two-domain image set (flat to striped shapes, {SIZE} px) in {data}")
        make_shapes(data, per_domain=200, size=SIZE)
    py = sys.executable
    for cmd in shard_commands(py, data, out):
        run(cmd)
    # the cores shared out among the ranks, unless OMP_NUM_THREADS already says (a busy machine, a test)
    threads = None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) // args.ranks)
    run(train_command(py, out, args.ranks, args.steps, real_data=bool(args.data)), threads)
    classifier = out / "domain-classifier.pt"
    run([py, "-m", "jobs.eval", "--train-classifier-only", "--domain-classifier", str(classifier),
         "--train-a", str(data / "trainA"), "--train-b", str(data / "trainB"), "--crop-size", str(SIZE)])
    run([py, "-m", "jobs.infer", "--checkpoint", str(out / "run" / "export" / "generator.pt"), "--input",
         str(data / "testA"), "--out", str(out / "translated"), "--workers", "1", "--no-progress"])
    note = (f"make demo: CUT trained {args.steps} steps on the CPU at {SIZE} px"
            + (f" on {data}. {REAL_DATA_NOTE}" if args.data else " on generated shapes (flat A, striped B)."))
    run([py, "-m", "jobs.eval", "--translated", str(out / "translated"), "--inputs", str(data / "testA"),
         "--test-b", str(data / "testB"), "--domain-classifier", str(classifier), "--out", str(out),
         "--crop-size", str(SIZE),
         "--samples", "16", "--metrics", "domain", "--note", note])
    metrics = json.loads((out / "metrics.json").read_text())
    print("\n" + summary(metrics, out, args.steps, time.perf_counter() - start))
    if args.data:
        print(REAL_DATA_NOTE)
    return 0


if __name__ == "__main__":
    run_job(main)
