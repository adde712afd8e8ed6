"""The whole system end to end on a laptop CPU: make data, shard it, train with torchrun, translate.

    make demo                      # generated shapes: flat (A) to striped (B)
    make demo DATA=path/to/set     # a folder with trainA/, trainB/ and testA/ (e.g. horse2zebra)

Every step runs the real command line a user would type; the output lands in demo-out/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from jobs.cli import HelpFormatter
from pipeline.manifest import read_manifest


def _shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, fill) -> None:
    x0, y0 = rng.integers(2, size // 3, 2)
    x1, y1 = x0 + rng.integers(size // 3, size // 2), y0 + rng.integers(size // 3, size // 2)
    box = (int(x0), int(y0), int(x1), int(y1))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)


def make_shapes(root: Path, per_domain: int, size: int = 64, seed: int = 0) -> None:
    """Domain A: flat coloured shapes; domain B: the same kind of shapes in black and white stripes."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_domain), ("test", max(4, per_domain // 5))):
        for domain in ("A", "B"):
            folder = root / f"{split}{domain}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                background = tuple(int(v) for v in rng.integers(170, 256, 3))
                img = Image.new("RGB", (size, size), background)
                if domain == "A":
                    _shape(ImageDraw.Draw(img), rng, size, tuple(int(v) for v in rng.integers(0, 160, 3)))
                else:
                    mask = Image.new("L", (size, size), 0)
                    _shape(ImageDraw.Draw(mask), rng, size, 255)
                    period = int(rng.integers(4, 9))
                    stripes = (np.indices((size, size)).sum(0) // period % 2 * 255).astype(np.uint8)
                    img.paste(Image.fromarray(stripes).convert("RGB"), (0, 0), mask)
                img.save(folder / f"{domain.lower()}-{i:04d}.png")


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.demo", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--data",
        default=os.environ.get("DATA") or None,
        help="folder with trainA/, trainB/ and testA/ (also DATA=...); default: generated shapes",
    )
    parser.add_argument(
        "--out",
        default=os.environ.get("DEMO_OUT", "demo-out"),
        help="output folder, emptied first (also DEMO_OUT=...)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=int(os.environ.get("DEMO_STEPS", "60")),
        help="training steps (also DEMO_STEPS=...)",
    )
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (gloo on the CPU)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = Path(args.data) if args.data else out / "data"
    if not args.data:
        print(f"generating a two-domain image set (flat to striped shapes) in {data}")
        make_shapes(data, per_domain=40)
    py = sys.executable
    for domain in ("A", "B"):
        run(
            [
                py,
                "-m",
                "jobs.shard",
                str(data / f"train{domain}"),
                "--out",
                str(out / "shards" / domain),
                "--prefix",
                f"train{domain}",
                "--domain",
                domain,
                "--max-count",
                "16",
                "--no-progress",
            ]
        )
    run(
        [
            py,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={args.ranks}",
            "-m",
            "jobs.train",
            "--config",
            "configs/tiny.yaml",
            f"data.a={out / 'shards' / 'A'}",
            f"data.b={out / 'shards' / 'B'}",
            f"run.url={out / 'run'}",
            f"train.max_steps={args.steps}",
            "train.n_epochs=50",
            "train.n_epochs_decay=50",
            "train.checkpoint_every=20",
            "train.log_every=10",
            "train.image_every=20",
        ]
    )
    run(
        [
            py,
            "-m",
            "jobs.infer",
            "--checkpoint",
            str(out / "run" / "export" / "generator.pt"),
            "--input",
            str(data / "testA"),
            "--out",
            str(out / "translated"),
            "--crop-size",
            "32",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    rows = read_manifest(str(out / "translated")).to_pylist()
    ok = sum(r["status"] == "ok" for r in rows)
    print(
        "\ndemo finished\n"
        f"  translated images : {out / 'translated' / 'images'}\n"
        f"  manifest (Parquet): {out / 'translated' / 'manifest'}  ({len(rows)} rows: {ok} ok, "
        f"{len(rows) - ok} errors)\n"
        f"  TensorBoard logs  : {out / 'run' / 'tb'}   (tensorboard --logdir {out / 'run' / 'tb'})\n"
        f"  checkpoints       : {out / 'run' / 'checkpoints'}\n"
        f"  first rows        : " + "; ".join(f"{r['key']} -> {Path(r['output_url']).name}" for r in rows[:3])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
