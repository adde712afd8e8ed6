"""Training-data throughput per core: shards (local, loopback S3) against the official folder loader.

`python -m bench.data [--root ../shared/datasets/horse2zebra] [--samples 400]`

Shards a subset of trainA/trainB into a temporary folder and into a moto S3 server started here on
127.0.0.1 (in its own process, so its CPU is not counted), then times decode + training augmentation
(286 bicubic resize, 256 random crop, flip, [-1, 1] tensor) in this process on one thread. Images/s per
core = images / CPU seconds of this process (the S3 client's I/O threads included).
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pipeline import storage
from pipeline.ingest import build_shards
from pipeline.unpaired import StreamPosition, UnpairedStream

LOAD, CROP = 286, 256


class OfficialFolderDataset(Dataset):
    """What the official `unaligned` dataset does per item, with torchvision's PIL ops written out."""

    def __init__(self, a_paths: list[str], b_paths: list[str]) -> None:
        self.a_paths, self.b_paths = a_paths, b_paths

    def __len__(self) -> int:
        return max(len(self.a_paths), len(self.b_paths))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        a = self.a_paths[index % len(self.a_paths)]
        b = self.b_paths[random.randint(0, len(self.b_paths) - 1)]
        return {"A": self._transform(Image.open(a).convert("RGB")),
                "B": self._transform(Image.open(b).convert("RGB"))}

    @staticmethod
    def _transform(img: Image.Image) -> torch.Tensor:
        img = img.resize((LOAD, LOAD), Image.Resampling.BICUBIC)  # transforms.Resize([286, 286], BICUBIC)
        top, left = random.randint(0, LOAD - CROP), random.randint(0, LOAD - CROP)  # RandomCrop(256)
        img = img.crop((left, top, left + CROP, top + CROP))
        if random.random() < 0.5:  # RandomHorizontalFlip()
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        tensor = torch.from_numpy(np.array(img, np.uint8, copy=True))  # ToTensor()
        tensor = tensor.view(CROP, CROP, 3).permute(2, 0, 1).contiguous().float().div(255)
        mean = std = torch.as_tensor((0.5, 0.5, 0.5))  # Normalize((0.5,) * 3, (0.5,) * 3)
        return tensor.sub_(mean[:, None, None]).div_(std[:, None, None])


def measure(batches: Callable[[], Iterable[dict]]) -> tuple[float, float]:
    """(images per CPU second, images per wall second) over one pass of `batches()`."""
    cpu, wall, images = time.process_time(), time.perf_counter(), 0
    for batch in batches():
        images += len(batch["A"]) + len(batch["B"])
    return images / (time.process_time() - cpu), images / (time.perf_counter() - wall)


Loader = Callable[[], Iterable[dict]]


def best_of_rounds(loaders: dict[str, Loader], rounds: int) -> dict[str, tuple[float, float]]:
    """Best (per CPU second, per wall second) of each loader; rounds interleave the loaders so that
    background load on the machine hits all of them alike."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, batches in loaders.items():
            runs[name].append(measure(batches))
    return {name: max(results) for name, results in runs.items()}


def start_s3() -> subprocess.Popen:
    """moto's S3 server on a free loopback port, endpoint and credentials exported to the environment."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    storage.filesystem("s3://bench")[0].mkdir("bench")
    return server


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/datasets/horse2zebra", help="folder with trainA, trainB")
    parser.add_argument("--samples", type=int, default=400, help="images per domain (default: 400)")
    parser.add_argument("--rounds", type=int, default=3, help="timed passes per loader; the best counts")
    args = parser.parse_args()
    torch.set_num_threads(1)
    paths = {d: sorted(str(p) for p in Path(args.root, f"train{d}").glob("*.jpg"))[: args.samples]
             for d in "AB"}
    server = start_s3()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sets: dict[str, tuple[str, str]] = {}
            for where, base in (("local", tmp), ("s3", "s3://bench/h2z")):
                for d in "AB":
                    listing = Path(tmp, f"{d}.txt")
                    listing.write_text("\n".join(paths[d]))
                    build_shards([str(listing)], storage.join(base, d), max_count=100, progress=False)
                sets[where] = (storage.join(base, "A"), storage.join(base, "B"))

            def stream_batches(where: str) -> Loader:
                stream = UnpairedStream(*sets[where], load_size=LOAD, crop_size=CROP, batch_size=1, seed=0,
                                        rank=0, world_size=1, workers=0)
                return lambda: stream.iterate(StreamPosition(0, 0))

            folder = OfficialFolderDataset(paths["A"], paths["B"])
            loaders = {"local shards": stream_batches("local"), "S3 shards": stream_batches("s3"),
                       "folder (official)": lambda: DataLoader(folder, batch_size=1, shuffle=True)}
            results = best_of_rounds(loaders, args.rounds)
    finally:
        server.terminate()
        server.wait()
    n = 2 * max(len(p) for p in paths.values())
    print(f"decode + train augmentation, {n} images per pass, 1 thread, best of {args.rounds}")
    for name, (per_cpu, per_wall) in results.items():
        print(f"  {name:18s} {per_cpu:7.1f} images/s per core   ({per_wall:7.1f} images/s wall)")
    folder_rate, local_rate, s3_rate = (results[k][0] for k in ("folder (official)", "local shards",
                                                                "S3 shards"))
    print(f"  local shards / folder: {local_rate / folder_rate:.2f}x  (goal >= 2x)")
    print(f"  S3 shards / folder:    {s3_rate / folder_rate:.2f}x")
    print(f"  S3 / local shards:     {s3_rate / local_rate:.2f}x  (goal >= 0.9x)")


if __name__ == "__main__":
    main()
