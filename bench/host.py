"""Host cost per image of jobs.infer: everything but the model, on one core, per output format and size.

    python -m bench.host [--images 960] [--sizes 256 1024] [--rounds 3]

Runs the real job (plan, a DataLoader worker process, batches, an encode thread, manifest: the
layout of a GPU node, whatever this machine's defaults) with a stand-in generator
that costs nothing (the identity behind the same interface: its outputs are its inputs), pinned to
one core, so wall time per image is the host's CPU cost per image: read, decode, resize, to
tensor, to pixels, encode, hash, write, manifest. Inputs: horse2zebra test JPEGs at 256x256
(`--images` of them, the 120 files repeated under distinct names), and the same images upscaled to
1024x1024 JPEGs (quality 90). The baseline, measured in the same run,
is the same job writing PNGs with Pillow at its default level, which jobs.infer did before
(`pipeline.png`). The per-stage split is CPU time summed over images.
Goal: at most 3 ms per image per core at 256x256 with the default output (PNG).

At 256x256 the same images also run as a lake keeps them (issue #28): `table` reads them from a
Parquet table (a binary `image` column and a `key` column, row groups of 100 rows, written once
outside the timing) and writes `--format table`; `table-in` reads the table and writes files. Printed
beside the file path (files in, PNG files out), with the ratio. Goal: the table path's host cost at
most the file path's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench.child import run_json

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "horse2zebra" / "testA"
FORMATS = ("png", "jpg", "webp", "png-pillow")
TABLE_VARIANTS = ("table-in", "table")  # table in, files out; table in, --format table out (PNG images)
TABLE_ROW_GROUP = 100


def measure(listing: str, out: str, size: int, fmt: str) -> dict:
    """One job on one core with the identity generator; seconds per image and per stage."""
    import io

    import torch
    from PIL import Image

    from cut import ResnetGenerator, export_generator
    from cut.checkpoint import to_bytes
    from jobs import infer
    from jobs.runtime import reuse_freed_memory
    from jobs.translator import Translator
    from pipeline import translation_io
    from pipeline.plan import worker_units
    from pipeline.planner import obtain_plan

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    reuse_freed_memory()  # as jobs.infer's main does
    torch.set_num_threads(1)
    ckpt = Path(out).parent / f"g-{fmt}-{size}.pt"
    ckpt.write_bytes(to_bytes(export_generator(ResnetGenerator(ngf=8, n_blocks=1))))
    image_format = "png" if fmt in ("png-pillow", *TABLE_VARIANTS) else fmt
    argv = ["--checkpoint", str(ckpt), "--input", listing, "--out", out, "--device", "cpu",
            "--crop-size", str(size), "--image-format", image_format, "--batch-size", "16", "--no-progress",
            "--workers", "1", "--encode-threads", "1"]  # a GPU node's layout: a decoding process, an encoder
    if fmt in TABLE_VARIANTS:
        argv += ["--key-column", "key"] + ["--format", "table"] * (fmt == "table")
    config = infer.load_infer_config(infer.build_parser().parse_args(argv))
    if fmt == "png-pillow":
        def pillow_png(pixels, fmt, quality, restore=None, png_level=1, alpha=None,
                       box=None) -> translation_io.Encoded:
            pixels, _ = translation_io.output_pixels(pixels, fmt, restore, alpha, box)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG")
            return translation_io.Encoded(buffer.getvalue(), "RGB")

        translation_io.encode_image = pillow_png
    translator = Translator(config)
    translator.translate.forward = torch.nn.Identity()
    identity = infer.job_identity(config, translator.model_sha256)
    plan = obtain_plan(out, config.inputs, identity, config.unit_size, worker=0)
    translator.run(worker_units(plan, 0, 1))
    images = translator.stats["ok"]
    assert images == plan.items, translator.stats
    return {
        "ms": 1000 * translator.elapsed / images,
        "stages": {k: 1000 * v / images for k, v in translator.seconds.items()},
        "kib": output_bytes(Path(out)) / images / 1024,
        "images": images,
    }


def output_bytes(out: Path) -> int:
    """Bytes of the translated images as stored: image files, shards or table parts (plan and manifest
    left out; a table part also holds its rows' manifest columns, a few hundred bytes a row)."""
    bookkeeping = {"_plan", "manifest"}
    return sum(p.stat().st_size for p in out.rglob("*")
               if p.is_file() and not bookkeeping & set(p.relative_to(out).parts) and p.name != "_SUCCESS")


def make_inputs(root: Path, files: list[Path], size: int, count: int) -> str:
    """A listing of `count` distinct input files (links to `files`, or upscaled copies of them)."""
    from PIL import Image

    folder = root / f"in-{size}"
    folder.mkdir()
    sources = files
    if size != 256:
        sources = []
        for f in files[:count]:
            path = folder / f"up-{f.name}"
            Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC).save(path, quality=90)
            sources.append(path)
    paths = []
    for i in range(count):
        path = folder / f"{i:06d}.jpg"
        path.symlink_to(sources[i % len(sources)])
        paths.append(path)
    listing = root / f"inputs-{size}.txt"
    listing.write_text("".join(f"{p}\n" for p in paths))
    return str(listing)


def make_table(root: Path, listing: str, parts: int = 4) -> str:
    """The listing's images as a Parquet table of `parts` files: `key` (string) and `image` (binary, the
    file's bytes), written with pyarrow in row groups of TABLE_ROW_GROUP rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = listing_paths(listing)
    folder = root / "table"
    folder.mkdir()
    step = -(-len(paths) // parts)
    for part, start in enumerate(range(0, len(paths), step)):
        chunk = paths[start:start + step]
        table = pa.table({"key": [p.stem for p in chunk], "image": [p.read_bytes() for p in chunk]},
                         schema=pa.schema([("key", pa.string()), ("image", pa.binary())]))
        pq.write_table(table, folder / f"part-{part:05d}.parquet", row_group_size=TABLE_ROW_GROUP)
    return str(folder)


def listing_paths(listing: str) -> list[Path]:
    return [Path(line) for line in Path(listing).read_text().splitlines() if line]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=960, help="inputs at 256x256 (a sixteenth at 1024x1024)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--rounds", type=int, default=3, help="runs per variant, alternating; the fastest counts")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--_one", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._one:
        listing, out, size, fmt = args._one
        print(json.dumps(measure(listing, out, int(size), fmt)))
        return
    files = sorted(args.data.glob("*.jpg"))
    print("jobs.infer on one core with an identity generator, start-up included; ms per image, fastest of "
          f"{args.rounds} runs. host = wall - model (the stand-in's own CPU: scaling pixels, which a GPU "
          "does on the device); stages: CPU time")
    stages = ("read", "decode", "preprocess", "model", "encode", "hash", "write", "manifest")
    header = f"{'size':>5} {'format':>10} {'wall':>6} {'host':>6} {'img/s':>6} {'KiB':>6} "
    print(header + " ".join(f"{s:>8}" for s in stages))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for size in args.sizes:
            count = max(16, args.images * 256**2 // size**2)
            listing = make_inputs(root, files, size, count)
            variants = FORMATS + TABLE_VARIANTS * (size == 256)
            inputs = {fmt: listing for fmt in FORMATS}
            if size == 256:
                inputs |= dict.fromkeys(TABLE_VARIANTS, make_table(root, listing))
            runs: dict[str, list[dict]] = {fmt: [] for fmt in variants}
            for r in range(args.rounds):
                for fmt in variants:
                    out = root / f"out-{size}-{fmt}-{r}"
                    cmd = [sys.executable, "-m", "bench.host", "--_one", inputs[fmt], str(out), str(size),
                           fmt]
                    runs[fmt].append(run_json(cmd))
                    shutil.rmtree(out)
            host = {}
            for fmt, results in runs.items():
                best = min(results, key=lambda r: r["ms"])
                host[fmt] = best["ms"] - best["stages"]["model"]
                split = " ".join(f"{best['stages'].get(s, 0.0):8.2f}" for s in stages)
                row = f"{size:5d} {fmt:>10} {best['ms']:6.2f} {host[fmt]:6.2f} {1000 / host[fmt]:6.0f} "
                print(row + f"{best['kib']:6.0f} " + split, flush=True)
            print(f"{size:5d} host cost of the default PNG against Pillow's PNG (the old default): "
                  f"{host['png-pillow'] / host['png']:.2f}x the images per core")
            if size == 256:
                ratio = host["table"] / host["png"]
                print(f"{size:5d} lake path, ms of host work per image per core: files in, files out "
                      f"{host['png']:.2f}; table in, files out {host['table-in']:.2f}; table in, table out "
                      f"{host['table']:.2f} ({ratio:.2f}x the file path's; goal <= 1.00x)")


if __name__ == "__main__":
    main()
