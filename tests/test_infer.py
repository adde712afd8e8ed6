"""jobs.infer: exactly-once manifests, error rows for bad inputs, workers, kill and rerun."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from image_helpers import decode_rgb, inference_transform
from inprocess import run_main
from PIL import Image

from cut import ResnetGenerator, export_generator
from cut.checkpoint import to_bytes
from cut.networks import init_weights
from jobs.infer import main as infer_main
from pipeline import storage
from pipeline.ingest import build_shards
from pipeline.manifest import read_manifest
from pipeline.shards import ShardIndex

ROOT = Path(__file__).resolve().parent.parent
BAD = {
    "corrupt.jpg": b"\xff\xd8\xff\xe0" + b"\x00garbage" * 20,
    "empty.png": b"",
    "notes.png": b"this is text, not an image",
}


def write_generator(
    path: Path, ngf: int = 8, n_blocks: int = 2, seed: int = 0, official: bool = False
) -> str:
    torch.manual_seed(seed)
    g = init_weights(ResnetGenerator(ngf=ngf, n_blocks=n_blocks), gain=0.5)
    obj = g.state_dict() if official else export_generator(g, preset="CUT")
    path.write_bytes(to_bytes(obj))
    return str(path)


def image_folder(root: Path, n: int, size=(44, 40), bad: bool = False) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / f"img-{i:03d}.png"
        )
    if bad:
        for name, data in BAD.items():
            (root / name).write_bytes(data)
        good = (root / "img-000.png").read_bytes()
        (root / "truncated.png").write_bytes(good[: len(good) // 2])
        Image.new("RGB", (300, 300)).save(root / "huge.png")
    return root


def sigkill_after_first_part(proc: subprocess.Popen, out: Path, timeout: float = 120) -> int:
    """SIGKILL a running jobs.infer once its first manifest part is committed; the parts committed then."""
    deadline = time.monotonic() + timeout
    while not list((out / "manifest").glob("part-*.parquet")) if (out / "manifest").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(list((out / "manifest").glob("part-*.parquet")))


def infer(*args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    cmd = [sys.executable, "-m", "jobs.infer", "--no-progress", "--crop-size", "32", *args]
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def infer_here(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`infer` without a process of its own: jobs.infer's main in this process (tests/inprocess.py),
    for tests of what the job writes and says rather than of how its process ends."""
    return run_main(infer_main, "--no-progress", "--crop-size", "32", *args, env=env)


def test_every_input_gets_one_row_and_bad_inputs_become_error_rows(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 5, bad=True)
    out = tmp_path / "out"
    done = infer_here(
        "--checkpoint",
        ckpt,
        "--input",
        str(src),
        "--out",
        str(out),
        "--unit-size",
        "3",
        "--max-pixels",
        "50000",
        "--batch-size",
        "2",
        "--workers",
        "2",
    )
    assert done.returncode == 0, done.stderr
    assert "ok 5, errors 5" in done.stdout
    rows = duckdb.sql(f"select * from read_parquet('{out}/manifest/*.parquet') order by key").fetchall()
    table = {
        r[0]: r
        for r in duckdb.sql(
            f"select key, status, error from read_parquet('{out}/manifest/*.parquet')"
        ).fetchall()
    }
    assert len(rows) == 10 and len(table) == 10
    assert table["corrupt"][1] == "error" and table["empty"][2].startswith("empty")
    assert table["notes"][2].startswith("not-an-image") and table["huge"][2].startswith("too-large")
    assert table["truncated"][2].startswith(("truncated", "corrupt"))
    assert all(table[f"img-{i:03d}"][1] == "ok" for i in range(5))
    success = storage.read_bytes(str(out / "_SUCCESS")).decode()
    assert '"ok": 5' in success and '"error": 5' in success and '"units": 4' in success


def test_output_equals_the_generator_applied_directly(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 3)
    out = tmp_path / "out"
    done = infer_here("--checkpoint", ckpt, "--input", str(src), "--out", str(out), "--workers", "0")
    assert done.returncode == 0, done.stderr
    manifest = read_manifest(str(out)).to_pylist()
    from cut import generator_from_checkpoint, read_checkpoint

    g = generator_from_checkpoint(read_checkpoint(Path(ckpt).read_bytes()))
    for row in manifest:
        x = inference_transform(decode_rgb((src / f"{row['key']}.png").read_bytes()), "official", 256, 32)
        with torch.no_grad():
            expected = ((g(x[None])[0].clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()
        got = np.asarray(Image.open(io.BytesIO(storage.read_bytes(row["output_url"]))))
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
        assert (row["width"], row["height"], row["out_width"], row["out_height"]) == (44, 40, 32, 32)
        assert row["model_id"].startswith(f"{ckpt}#sha256=") and row["preset"] == "CUT"


def test_official_checkpoint_and_size_preserving_modes(tmp_path):
    ckpt = write_generator(tmp_path / "latest_net_G.pth", official=True)
    src = image_folder(tmp_path / "in", 2, size=(45, 38))
    for mode, size in (("none", (45, 38)), ("shortside", (48, 40))):
        out = tmp_path / mode
        done = infer_here(
            "--checkpoint",
            ckpt,
            "--input",
            str(src),
            "--out",
            str(out),
            "--preprocess",
            mode,
            "--load-size",
            "40",
            "--image-format",
            "jpg",
            "--workers",
            "0",
        )
        assert done.returncode == 0, done.stderr
        for row in read_manifest(str(out)).to_pylist():
            assert (row["out_width"], row["out_height"]) == size
            assert Image.open(io.BytesIO(storage.read_bytes(row["output_url"]))).size == size
            assert row["preset"] == "unknown" and row["output_url"].endswith(".jpg")


@pytest.mark.slow
def test_shards_on_s3_in_and_out_with_an_unreadable_shard(tmp_path, s3_url):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 7)
    build_shards([str(src)], f"{s3_url}/in", prefix="in", max_count=3, workers=1, progress=False)
    shard = storage.read_bytes(f"{s3_url}/in/in-000001.tar")
    storage.write_bytes_atomic(f"{s3_url}/in/in-000001.tar", shard[:1500])  # cut midway
    storage.remove(f"{s3_url}/in/in-000002.tar")
    out = f"{s3_url}/out"
    done = infer(
        "--checkpoint", ckpt, "--input", f"{s3_url}/in", "--out", out, "--format", "shards", "--workers", "1"
    )
    assert done.returncode == 0, done.stderr
    rows = read_manifest(out).to_pylist()
    assert len(rows) == 7
    errors = [r for r in rows if r["status"] == "error"]
    assert errors and all(r["error"].startswith("shard-error") for r in errors)
    assert sum(r["status"] == "ok" for r in rows) >= 3 and [r["unit"] for r in errors].count(2) == 1
    first = storage.read_bytes(f"{out}/shards/part-000000.tar")
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(first)) as tar:  # keys of shard samples carry the shard's name
        names = [f"in-000000.tar/img-00{i}.{ext}" for i in range(3) for ext in ("json", "png")]
        assert tar.getnames() == names
    assert ShardIndex.load(f"{out}/shards").samples == sum(r["status"] == "ok" for r in rows)


@pytest.mark.slow
def test_torchrun_ranks_and_indexed_job_indexes_share_the_units(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 8))
    out = tmp_path / "torchrun"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "jobs.infer",
        "--no-progress",
        "--crop-size",
        "32",
        "--checkpoint",
        ckpt,
        "--input",
        src,
        "--out",
        str(out),
        "--unit-size",
        "2",
        "--workers",
        "0",
    ]
    done = subprocess.run(
        cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    workers = {r["unit"]: r["worker"] for r in read_manifest(str(out)).to_pylist()}
    assert workers == {0: 0, 1: 1, 2: 0, 3: 1}
    assert (out / "_SUCCESS").exists()

    indexed = tmp_path / "indexed"
    args = ["--checkpoint", ckpt, "--input", src, "--out", str(indexed), "--unit-size", "2", "--workers", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", JOB_COMPLETIONS="2")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "jobs.infer", "--no-progress", "--crop-size", "32", *args],
            cwd=ROOT,
            env={**env, "JOB_COMPLETION_INDEX": str(i)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    assert [p.wait(180) for p in procs] == [0, 0]
    rows = read_manifest(str(indexed)).to_pylist()
    assert sorted(r["key"] for r in rows) == [f"img-{i:03d}" for i in range(8)]
    assert {r["unit"]: r["worker"] for r in rows} == {0: 0, 1: 1, 2: 0, 3: 1}
    assert (indexed / "_SUCCESS").exists()


@pytest.mark.slow
def test_killed_and_rerun_job_gives_exactly_once_and_identical_outputs(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt", ngf=16, n_blocks=4)
    src = str(image_folder(tmp_path / "in", 24, size=(64, 64)))
    args = [
        "--checkpoint",
        ckpt,
        "--input",
        src,
        "--unit-size",
        "2",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--crop-size",
        "64",
    ]
    ref = tmp_path / "ref"
    assert infer(*args, "--out", str(ref)).returncode == 0

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jobs.infer", "--no-progress", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    committed = sigkill_after_first_part(proc, out)
    assert 1 <= committed < 12 and not (out / "_SUCCESS").exists()
    rerun = infer(*args, "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert f"({committed} already committed)" in rerun.stderr or committed == 0

    def comparable(root: Path) -> list[dict]:
        rows = read_manifest(str(root)).to_pylist()
        for r in rows:
            r.pop("elapsed_ms")
            r["output_url"] = os.path.relpath(r["output_url"], root)
        return sorted(rows, key=lambda r: r["key"])

    assert comparable(out) == comparable(ref)
    assert len(comparable(out)) == 24
    for path in (ref / "images").rglob("*.png"):
        assert path.read_bytes() == (out / path.relative_to(ref)).read_bytes()
    assert pq.read_table(str(out / "manifest")).num_rows == 24


def test_a_unit_whose_outputs_cannot_be_written_is_reported_and_others_commit(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    first = image_folder(tmp_path / "first", 2)
    second = image_folder(tmp_path / "second", 2)
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "0").write_text("a file where the job needs a folder")
    args = ["--checkpoint", ckpt, "--input", str(first), str(second), "--out", str(out), "--workers", "0"]
    failed = infer_here(*args)
    assert failed.returncode == 1 and "units [0] failed" in failed.stderr
    assert [r["unit"] for r in read_manifest(str(out)).to_pylist()] == [1, 1]
    assert not (out / "_SUCCESS").exists()
    (out / "images" / "0").unlink()
    assert infer_here(*args).returncode == 0
    assert len(read_manifest(str(out))) == 4 and (out / "_SUCCESS").exists()


def test_bad_arguments_are_clear_errors(tmp_path):
    bad = infer_here("--checkpoint", "x", "--input", "y", "--out", "z", "--batch-size", "0")
    assert bad.returncode == 2 and "--batch-size must be >= 1" in bad.stderr
    src = image_folder(tmp_path / "in", 1)
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    broken = infer_here(
        "--checkpoint", str(tmp_path / "broken.pt"), "--input", str(src), "--out", str(tmp_path / "o")
    )
    assert broken.returncode == 2 and "not a readable torch checkpoint" in broken.stderr
