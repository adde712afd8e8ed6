"""Shared fixtures: a real S3-compatible server on loopback, tiny image files, and the public datasets
a few tests train on (found through CUT_DATASETS)."""

from __future__ import annotations

import atexit
import io
import os
import socket
import struct
import sys
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import s3fs
from moto.server import ThreadedMotoServer
from PIL import Image

BUCKET = "cut-test"
# The folder holding the public datasets (horse2zebra/, ...) that tests training on real images need:
# CUT_DATASETS, else ../shared/datasets beside the clone (where CI keeps them).
DATASETS_VARIABLE = "CUT_DATASETS"
DEFAULT_DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "datasets"


_EXIT = {"status": 0}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker process gets its share of the cores for torch's threads (two workers
    with every core each would fight over them; subprocesses a test starts choose their own)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))


# The longest test files, started first: with the files shared among xdist workers in collection order
# (the Makefile's --no-loadscope-reorder; xdist's default puts the files with the most tests first), a
# long file collected late runs alone at the end while the other workers wait.
LONGEST_FIRST = ("test_demo.py", "test_bench.py", "test_sincut_jobs.py", "test_infer_ray.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave with pytest's own status, past the interpreter's teardown: tests read Parquet and Delta tables
    in this process, and Arrow's pool threads can abort a finalizing interpreter (exit 134 after every test
    passed; docs/lake-tables.md says why), as jobs.cli.end_process avoids for the jobs. An xdist worker's
    exit is not its result, so workers end as usual."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_EXIT["status"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; endpoint and credentials set in the environment as a user would."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(BUCKET)
        yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture
def s3_url(s3_server: str) -> Iterator[str]:
    """A fresh `s3://` prefix for one test; cached s3fs clients are dropped afterwards."""
    yield f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem.clear_instance_cache()


def image_bytes(seed: int, size: tuple[int, int] = (48, 40), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small random image, encoded."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


def png_bomb(width: int = 20_000, height: int = 20_000) -> bytes:
    """A PNG whose header claims a huge image: a decompression bomb as far as a decoder can tell."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture
def make_images(tmp_path: Path) -> Callable[..., Path]:
    """`make_images(name, n)`: a folder of n small JPEGs (img-000.jpg ...) in a nested layout."""

    def make(name: str, n: int, start_seed: int = 0) -> Path:
        folder = tmp_path / name
        for i in range(n):
            path = folder / f"part{i % 2}" / f"img-{i:03d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(start_seed + i))
        return folder

    return make


@pytest.fixture
def dataset() -> Callable[[str], Path]:
    """`dataset(name)`: the folder of a public unpaired dataset (trainA/ and trainB/ of images, as the
    CycleGAN/CUT download scripts unpack it) under $CUT_DATASETS; skips the test, saying how to provide
    it, when the folder is not there."""

    def find(name: str) -> Path:
        root = Path(os.environ.get(DATASETS_VARIABLE) or DEFAULT_DATASETS)
        folder = root / name
        if not ((folder / "trainA").is_dir() and (folder / "trainB").is_dir()):
            pytest.skip(f"needs the {name} dataset: set {DATASETS_VARIABLE} to a folder holding "
                        f"{name}/trainA/ and {name}/trainB/ (images; the CUT repository's "
                        f"datasets/download_cut_dataset.sh {name} fetches them); looked in {folder}")
        return folder

    return find
