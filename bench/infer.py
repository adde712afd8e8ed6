"""Images per second of jobs.infer against the official test.py path and a plain loop, in one run.

    python -m bench.infer [--images 24] [--threads 2]

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
  made and verified before the timed runs), run by onnxruntime's CPU execution provider.
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each; the fastest counts")
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
        export.export(str(root / "g.pt"), str(root / "onnx"), "onnx")
        listing = root / "inputs.txt"
        listing.write_text("".join(f"{f}\n" for f in files))
        b_files = sorted((args.data.parent / "testB").glob("*.jpg"))
        official_test_path(official, files[:1], b_files, root / "warm-official")
        plain_loop(g, files[:1], root / "warm-ours")
        seconds: dict[str, list[float]] = {"official": [], "plain": [], "job": [], "onnx": []}
        for r in range(args.rounds):  # alternate, so drifting machine load hits all three alike
            seconds["official"].append(official_test_path(official, files, b_files, root / f"official-{r}"))
            seconds["plain"].append(plain_loop(g, files, root / f"plain-{r}"))
            for name, engine in (("job", ["--checkpoint", str(root / "g.pt")]),
                                 ("onnx", ["--checkpoint", str(root / "onnx"), "--engine", "onnxruntime"])):
                start = time.perf_counter()
                argv = [*engine, "--input", str(listing), "--no-progress", "--out", str(root / f"{name}-{r}")]
                assert infer.main(argv) == 0
                seconds[name].append(time.perf_counter() - start)
    n = len(files)
    rate = {k: n / min(v) for k, v in seconds.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, {n} images at 256x256, resnet_9blocks, PNGs, "
          f"fastest of {args.rounds} alternating runs")
    print(f"official test.py path (official network)  : {rate['official']:7.3f} images/s")
    print(f"plain per-image loop over our generator   : {rate['plain']:7.3f} images/s")
    print(f"jobs.infer (CPU defaults, start-up incl.) : {rate['job']:7.3f} images/s")
    print(f"jobs.infer --engine onnxruntime           : {rate['onnx']:7.3f} images/s")
    print(f"jobs.infer / official test.py path        : {rate['job'] / rate['official']:7.2f}x")
    print(f"jobs.infer / plain loop                   : {rate['job'] / rate['plain']:7.2f}x")
    print(f"onnxruntime engine / torch engine         : {rate['onnx'] / rate['job']:7.2f}x")


if __name__ == "__main__":
    main()
