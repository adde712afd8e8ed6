"""jobs.infer --format table / delta: the outputs as Parquet parts or a Delta table that pyarrow, DuckDB,
`datasets` and `deltalake` read; one Delta transaction per unit, never repeated by a retry; every
input exactly once after kills and reruns; the documented exit codes with deltalake loaded."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError
from PIL import Image
from test_infer import image_folder, infer_here, write_generator

from pipeline import delta
from pipeline.manifest import read_manifest
from pipeline.table_output import unit_table
from pipeline.translation_io import error_record

ROOT = Path(__file__).resolve().parent.parent
# The native kernels are beside the point here, and building them costs a process tens of seconds.
JOB_ENV = {"OMP_NUM_THREADS": "1", "CUT_NATIVE": "0"}


def png(value: int, size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def job(*args: str) -> list[str]:
    return [sys.executable, "-m", "jobs.infer", "--no-progress", "--crop-size", "32", "--workers", "0", *args]


def run_job(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **JOB_ENV}, capture_output=True, text=True,
                          timeout=timeout)


def delta_in_subprocess(url: str) -> dict:
    """Version, history and row keys of a Delta table, read in a process of its own: deltalake's
    history() holds the GIL while it waits on the network, so against the moto server that runs in
    this process's threads it would wait for ever."""
    code = ("import json, sys, os; from deltalake import DeltaTable; from pipeline.delta import open_table\n"
            "t = open_table(sys.argv[1]); h = t.history()\n"
            "print(json.dumps({'version': t.version(), 'operations': [x['operation'] for x in h],\n"
            "    'keys': t.to_pyarrow_table(columns=['key']).column('key').to_pylist()}))\n"
            "sys.stdout.flush(); os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code, url], cwd=ROOT, env={**os.environ, **JOB_ENV},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


# ------------------------------------------------------------------------------------------ fast tests
def test_a_unit_table_holds_images_as_datasets_decodes_them_and_error_rows_with_a_null_image(tmp_path):
    import datasets

    rows = [{"order": 0, "key": "a/cat", "source_url": "/in/a/cat.png", "status": "ok", "width": 8,
             "height": 8, "output_url": "OUT/table/part-000003.parquet#a/cat.png"},
            error_record(1, "dog", "/in/dog.png", "corrupt", "bad bytes", 10)]
    table = unit_table(rows, {0: png(200)}, "png")
    assert table.column_names[:3] == ["image", "key", "source_url"]
    assert table.column("image").to_pylist() == [{"bytes": png(200), "path": "a/cat.png"}, None]
    pq.write_table(table, tmp_path / "part-000003.parquet")

    loaded = datasets.load_dataset("parquet", data_files=[str(tmp_path / "part-000003.parquet")],
                                   split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert isinstance(loaded.features["image"], datasets.Image)
    assert np.array_equal(np.asarray(loaded[0]["image"]), np.full((8, 8, 3), 200, np.uint8))
    assert loaded[1]["image"] is None and loaded[1]["error"] == "corrupt"
    # NumPy outputs are no image `datasets` decodes: the column stays a plain struct
    assert unit_table(rows, {0: b"npy"}, "npy").schema.metadata is None


def test_storage_options_reach_s3_compatible_stores_from_the_environment(monkeypatch):
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert delta.storage_options("s3://bucket/table") == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ALLOW_HTTP": "true", "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret"}
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.example")
    assert delta.storage_options("s3://bucket/table")["AWS_ENDPOINT_URL"] == "https://minio.example"
    assert "AWS_ALLOW_HTTP" not in delta.storage_options("s3://bucket/table")
    assert delta.storage_options("/data/table") == delta.storage_options("file:///data/table") == {}


def test_snapshot_files_come_from_the_log_with_sizes_partitions_and_named_versions(tmp_path):
    url = str(tmp_path / "horses")
    write_deltalake(url, pa.table({"image": [b"a", b"b"], "split": ["train set", "test"]}),
                    partition_by=["split"])
    write_deltalake(url, pa.table({"image": [b"c"], "split": ["test"]}), mode="overwrite",
                    partition_by=["split"])

    version, files = delta.snapshot_files(url)
    assert version == 1 and len(files) == 1
    [(file_url, size, partition)] = files
    assert partition == {"split": "test"} and os.path.getsize(file_url) == size
    assert pq.read_table(file_url).column("image").to_pylist() == [b"c"]

    version, files = delta.snapshot_files(url, version=0)
    assert version == 0 and sorted(p["split"] for _, _, p in files) == ["test", "train set"]
    assert all(os.path.getsize(f) == size for f, size, _ in files)  # 'train set': escaped on disk

    with pytest.raises(delta.DeltaVersionError, match=r"has no version 7: its versions are 0 to 1"):
        delta.snapshot_files(url, version=7)
    DeltaTable(url).vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=False)
    with pytest.raises(delta.DeltaVersionError, match=rf"version 0 of {url} was vacuumed: 2 of its 2"):
        delta.snapshot_files(url, version=0)
    assert delta.snapshot_files(url)[1] == [(file_url, size, partition)]  # vacuum kept the current files
    with pytest.raises(FileNotFoundError, match="no Delta table at"):
        delta.snapshot_files(str(tmp_path / "nothing"))


def test_an_append_with_a_transaction_already_in_the_log_adds_nothing(tmp_path):
    url = str(tmp_path / "out")
    assert delta.append_once(url, pa.table({"key": ["a"]}), "job/unit-000000")
    stale = DeltaTable(url)  # a worker's snapshot, taken before another attempt of its unit commits
    assert delta.append_once(url, pa.table({"key": ["b"]}), "job/unit-000001")
    assert not delta.append_once(url, pa.table({"key": ["b"]}), "job/unit-000001")
    # Delta's conflict check refuses a commit whose transaction id a newer commit wrote: two attempts
    # of one unit racing past the check in append_once cannot both append
    with pytest.raises(CommitFailedError):
        again = CommitProperties(app_transactions=[Transaction("job/unit-000001", 0)])
        write_deltalake(stale, pa.table({"key": ["b"]}), mode="append", commit_properties=again)
    table = DeltaTable(url)
    assert table.version() == 1 and sorted(table.to_pyarrow_table().column("key").to_pylist()) == ["a", "b"]


# ------------------------------------------------------------------------------ end-to-end (slow)
@pytest.mark.slow
def test_table_parts_read_by_pyarrow_duckdb_and_datasets_and_a_rerun_rewrites_an_uncommitted_part(tmp_path):
    import datasets

    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 4, bad=True)  # 4 images, 3 bad files, a truncated and a huge one
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(src), "--out", str(out), "--format", "table",
            "--unit-size", "3"]
    done = infer_here(*args, env=JOB_ENV)
    assert done.returncode == 0, done.stderr
    parts = sorted((out / "table").glob("*.parquet"))
    assert [p.name for p in parts] == [f"part-{i:06d}.parquet" for i in range(3)]
    assert not (out / "images").exists()

    table = pq.read_table(out / "table")
    manifest = read_manifest(str(out))
    assert table.num_rows == manifest.num_rows == 9
    assert table.drop_columns(["image"]).sort_by("key").equals(manifest.sort_by("key"))
    for row in table.to_pylist():  # the image is the output the manifest describes, or null
        if row["status"] == "ok":
            assert hashlib.sha256(row["image"]["bytes"]).hexdigest() == row["output_sha256"]
            assert row["image"]["path"] == row["key"] + ".png"
            assert row["output_url"] == f"{out}/table/part-{row['unit']:06d}.parquet#{row['key']}.png"
        else:
            assert row["image"] is None
    counts = duckdb.sql(f"SELECT status, count(*) FROM read_parquet('{out}/table/*.parquet') GROUP BY status "
                        f"ORDER BY status").fetchall()
    assert counts == [("error", 4), ("ok", 5)]

    loaded = datasets.load_dataset("parquet", data_files=[str(p) for p in parts], split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    first = next(r for r in loaded if r["key"] == "img-000")
    stored = next(r for r in table.to_pylist() if r["key"] == "img-000")["image"]["bytes"]
    assert np.array_equal(np.asarray(first["image"]), np.asarray(Image.open(io.BytesIO(stored))))
    assert first["image"].size == (32, 32)

    # a worker killed after writing unit 1's table part, before its manifest part: the rerun rewrites it
    (out / "manifest" / "part-000001.parquet").unlink()
    (out / "_SUCCESS").unlink()
    (out / "table" / "part-000001.parquet").write_bytes(b"half a part")
    rerun = infer_here(*args, env=JOB_ENV)
    assert rerun.returncode == 0, rerun.stderr
    again = pq.read_table(out / "table")
    assert sorted(again.column("key").to_pylist()) == sorted(table.column("key").to_pylist())
    assert (out / "_SUCCESS").exists()


@pytest.mark.slow
def test_delta_output_is_one_transaction_per_unit_and_a_retried_unit_adds_none(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 5, bad=True)  # 10 inputs: 6 translate, 4 are error rows
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(src), "--out", str(out), "--format", "delta",
            "--unit-size", "4"]
    assert infer_here(*args, env=JOB_ENV).returncode == 0

    table = DeltaTable(str(out / "table"))
    assert table.version() == 2  # units 0, 1, 2: one commit each (the first creates the table)
    assert [h["operation"] for h in table.history()] == ["WRITE"] * 3
    rows = table.to_pyarrow_table()
    manifest = read_manifest(str(out))
    assert rows.num_rows == manifest.num_rows == 10

    def by_key(rows: list[dict]) -> list[dict]:
        return sorted(({k: v for k, v in r.items() if k != "image"} for r in rows), key=lambda r: r["key"])

    assert by_key(rows.to_pylist()) == by_key(manifest.to_pylist())
    db = duckdb.connect()  # DuckDB reads a Delta table through deltalake's Arrow dataset
    db.register("translated", table.to_pyarrow_dataset())
    assert db.sql("SELECT count(*), count(image) FROM translated").fetchall() == [(10, 6)]
    job = json.loads((out / "_plan" / "plan.json").read_text())
    assert job["units"] == 3

    # killed between unit 2's Delta commit and its manifest part: the rerun finds its transaction
    (out / "manifest" / "part-000002.parquet").unlink()
    (out / "_SUCCESS").unlink()
    rerun = infer_here(*args, env=JOB_ENV)
    assert rerun.returncode == 0, rerun.stderr
    table = DeltaTable(str(out / "table"))
    assert table.version() == 2
    keys = table.to_pyarrow_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == sorted(set(keys)) == sorted(manifest.column("key").to_pylist())
    assert read_manifest(str(out)).num_rows == 10 and (out / "_SUCCESS").exists()


@pytest.mark.slow
def test_two_workers_commit_to_one_delta_table_on_s3_at_once(tmp_path, s3_url):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 8)
    out = f"{s3_url}/out"
    args = ["--checkpoint", ckpt, "--input", str(src), "--out", out, "--format", "delta", "--unit-size", "1",
            "--num-workers", "2"]
    procs = [subprocess.Popen(job(*args, "--worker-index", str(i)), cwd=ROOT, env={**os.environ, **JOB_ENV},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    found = delta_in_subprocess(f"{out}/table")
    assert found["version"] == 7 and found["operations"] == ["WRITE"] * 8
    assert sorted(found["keys"]) == [f"img-{i:03d}" for i in range(8)]
    assert read_manifest(out).num_rows == 8


@pytest.mark.slow
def test_a_worker_killed_mid_run_and_rerun_leaves_every_input_once_in_the_delta_table(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 30)
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(src), "--out", str(out), "--format", "delta",
            "--unit-size", "1", "--num-workers", "2"]
    env = {**os.environ, **JOB_ENV}
    procs = [subprocess.Popen(job(*args, "--worker-index", str(i)), cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(2)]
    deadline = time.monotonic() + 240
    while not list((out / "manifest").glob("part-*1.parquet")) if (out / "manifest").exists() else True:
        assert procs[1].poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGKILL)  # worker 1 after its first commit, on its way through the next
    assert procs[1].wait() == -signal.SIGKILL and procs[0].wait(240) == 0
    assert not (out / "_SUCCESS").exists()
    rerun = run_job(job(*args, "--worker-index", "1"))
    assert rerun.returncode == 0, rerun.stderr
    table = DeltaTable(str(out / "table"))
    keys = table.to_pyarrow_table(columns=["key"]).column("key").to_pylist()
    assert sorted(keys) == [f"img-{i:03d}" for i in range(30)]
    assert len(table.history()) == 30 and (out / "_SUCCESS").exists()


# A job that reads a Delta table (as table inputs do) and returns: with deltalake 1.6.6 and pyarrow 26
# a plain interpreter exit then aborts in some runs (docs/lake-tables.md); jobs leave by end_process.
READS_THEN_EXITS = """
import sys
from jobs.cli import run_job
from jobs.infer import main
from pipeline.delta import open_table

def main_then_read():
    code = main(sys.argv[2:])
    open_table(sys.argv[1]).to_pyarrow_table()  # Arrow I/O threads still release its buffers as we leave
    return code

run_job(main_then_read)
"""


@pytest.mark.slow
def test_documented_exit_codes_hold_with_deltalake_loaded(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 2)
    out = tmp_path / "out"
    base = ["--no-progress", "--crop-size", "32", "--workers", "0", "--checkpoint", ckpt, "--format", "delta",
            "--unit-size", "1"]
    first = run_job([sys.executable, "-m", "jobs.infer", *base, "--input", str(src), "--out", str(out)])
    assert first.returncode == 0, first.stderr
    wrapped = [sys.executable, "-c", READS_THEN_EXITS, str(out / "table"), *base]
    for _ in range(5):
        again = run_job([*wrapped, "--input", str(src), "--out", str(out)])  # all committed: writes nothing
        assert again.returncode == 0, again.stderr
        other = run_job([*wrapped, "--input", str(src), "--out", str(out), "--image-format", "jpg"])
        assert other.returncode == 2, other.stderr  # another job's settings: refused before writing
        assert "planned with other settings" in other.stderr

    many = str(image_folder(tmp_path / "many", 40))
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        cmd = [*wrapped, "--input", many, "--out", str(tmp_path / f"stopped-{code}")]
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **JOB_ENV}, stderr=subprocess.PIPE,
                                text=True)
        assert proc.stderr is not None
        for line in proc.stderr:  # the worker has its units: a first signal finishes the units under way
            if "units to do" in line:
                break
        proc.send_signal(sig)
        rest = proc.stderr.read()
        assert proc.wait(120) == code, rest
