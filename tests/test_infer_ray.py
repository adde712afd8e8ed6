"""jobs.infer --executor ray on a real local Ray cluster: the local executor's rows and bytes (bad
inputs, S3 in and out), an actor killed by its pid, the driver killed and the job finished by a rerun,
clear failures."""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from inprocess import run_main
from test_infer import image_folder, sigkill_after_first_part, write_generator

from jobs.infer import main as infer_main
from pipeline import storage
from pipeline.manifest import read_manifest
from pipeline.shards import ShardIndex

ROOT = Path(__file__).resolve().parent.parent


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """One Ray head on loopback for the module (`ray start --block`, 2 CPUs, its own ports and temp
    folder), stopped by ending that process."""
    port, client, dashboard, agent, agent_grpc, metrics, env_agent = free_ports(7)
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    log_path = Path(temp) / "head.log"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
           "--node-ip-address=127.0.0.1", f"--port={port}", f"--ray-client-server-port={client}",
           f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={env_agent}", "--num-cpus=2", "--include-dashboard=false",
           f"--temp-dir={temp}", "--disable-usage-stats"]
    with log_path.open("w") as log:
        head = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "block forever" not in log_path.read_text():
            assert head.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        subprocess.run(["rm", "-rf", temp], check=False)


def infer_here(*args: str) -> subprocess.CompletedProcess:
    return run_main(infer_main, "--no-progress", "--crop-size", "32", *args)


def infer_process(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "jobs.infer", "--no-progress", *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(out: str) -> list[dict]:
    """The manifest rows but their timing, output URLs relative to the output."""
    rows = read_manifest(out).to_pylist()
    for row in rows:
        row.pop("elapsed_ms")
        if row["output_url"]:
            row["output_url"] = row["output_url"][len(out):]
    return sorted(rows, key=lambda r: r["key"])


def same_files(a: Path, b: Path, pattern: str) -> None:
    files = sorted(p.relative_to(a) for p in a.rglob(pattern))
    assert files and files == sorted(p.relative_to(b) for p in b.rglob(pattern))
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def workload(tmp_path_factory) -> tuple[list[str], Path]:
    """A job of 10 one-image units and its outputs from the local executor."""
    root = tmp_path_factory.mktemp("workload")
    ckpt = write_generator(root / "g.pt", ngf=16, n_blocks=4)
    src = image_folder(root / "in", 10, size=(48, 48))
    args = ["--checkpoint", ckpt, "--input", str(src), "--unit-size", "1", "--batch-size", "1",
            "--crop-size", "48"]
    done = infer_here(*args, "--out", str(root / "local"))
    assert done.returncode == 0, done.stderr
    return args, root / "local"


def lines_of(stream) -> queue.Queue:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in stream], daemon=True).start()
    return lines


@pytest.mark.slow
def test_an_actor_killed_by_its_pid_mid_run_is_restarted_and_every_row_commits_once(
        tmp_path, ray_address, workload):
    args, reference = workload
    out = tmp_path / "out"
    proc = infer_process(*args, "--out", str(out), "--executor", "ray", "--ray-address", ray_address)
    lines, said = lines_of(proc.stderr), []
    while not (found := re.search(r"translation actor 0: pid (\d+)", said[-1] if said else "")):
        said.append(lines.get(timeout=120))
    assert not (out / "_SUCCESS").exists()  # mid-run: the actor is about to take, or has, units
    os.kill(int(found.group(1)), signal.SIGKILL)
    assert proc.wait(180) == 0, "".join(said) + proc.stderr.read() if proc.stderr else ""
    assert comparable(str(out)) == comparable(str(reference))
    assert pq.read_table(str(out / "manifest")).num_rows == 10
    same_files(reference / "images", out / "images", "*.png")


@pytest.mark.slow
def test_a_killed_driver_is_finished_by_a_rerun_with_the_other_executor(tmp_path, ray_address, workload):
    args, reference = workload
    out = tmp_path / "out"
    proc = infer_process(*args, "--out", str(out), "--executor", "ray", "--ray-address", ray_address)
    committed = sigkill_after_first_part(proc, out)
    assert 1 <= committed < 10 and not (out / "_SUCCESS").exists()
    rerun = infer_here(*args, "--out", str(out))  # --executor local
    assert rerun.returncode == 0, rerun.stderr
    assert f"({committed} already committed)" in rerun.stderr
    assert comparable(str(out)) == comparable(str(reference))
    same_files(reference / "images", out / "images", "*.png")


@pytest.mark.slow
def test_ray_gives_the_local_executors_rows_and_bytes_for_bad_inputs_on_s3(tmp_path, s3_url, ray_address):
    """S3 inputs (bad images among them) to S3 shard outputs: the tasks reach the store with the
    driver's AWS_* environment, which the executor passes on."""
    ckpt = write_generator(tmp_path / "g.pt")
    for path in image_folder(tmp_path / "in", 5, bad=True).iterdir():
        storage.write_bytes_atomic(f"{s3_url}/in/{path.name}", path.read_bytes())
    args = ["--checkpoint", ckpt, "--input", f"{s3_url}/in/", "--unit-size", "3", "--max-pixels", "50000",
            "--batch-size", "2", "--format", "shards"]
    assert infer_here(*args, "--out", f"{s3_url}/local").returncode == 0
    ray = infer_here(*args, "--out", f"{s3_url}/ray", "--executor", "ray", "--ray-address", ray_address)
    assert ray.returncode == 0, ray.stderr
    assert "ok 5, errors 5" in ray.stdout and "translation actor 0: pid" in ray.stderr
    rows = comparable(f"{s3_url}/ray")
    assert rows == comparable(f"{s3_url}/local") and len(rows) == 10
    assert {r["key"]: r["error"] for r in rows if r["status"] == "error"}.keys() == {
        "corrupt", "empty", "notes", "truncated", "huge"}
    units = sorted({r["unit"] for r in rows if r["status"] == "ok"})
    for unit in units:
        name = f"shards/part-{unit:06d}.tar"
        data = storage.read_bytes(f"{s3_url}/ray/{name}")
        assert data == storage.read_bytes(f"{s3_url}/local/{name}")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            assert tar.getnames()
    assert ShardIndex.load(f"{s3_url}/ray/shards").samples == 5
    assert storage.read_bytes(f"{s3_url}/ray/_SUCCESS") == storage.read_bytes(f"{s3_url}/local/_SUCCESS")


@pytest.mark.parametrize(("record_bytes", "images"),
                         [(64 << 20, [9, 9, 1]), (2 * 3 * 3 * 32 * 32, [6, 6, 6, 1])])
def test_a_units_records_carry_whole_batches_up_to_8_images_or_their_bytes_and_its_end_message_last(
        tmp_path, monkeypatch, record_bytes, images):
    """The read stage, without Ray: 19 images (32x32) at batch size 3 go as records of whole batches
    until one holds 8 images or `RECORD_BYTES` of pixels (here the bytes of 6 images), the last
    record holding the rest and the unit's end message; every input once, in order."""
    import pickle

    import jobs.ray_executor as executor
    from pipeline.corpus import plan_units
    from pipeline.translation_io import Preprocess

    assert executor.RECORD_IMAGES == 8
    monkeypatch.setattr(executor, "RECORD_BYTES", record_bytes)
    (unit,) = plan_units([str(image_folder(tmp_path / "in", 19, size=(32, 32)))], unit_size=19)
    item = {"unit": unit.index, "payload": pickle.dumps(unit)}
    preprocess = Preprocess(load_size=32, crop_size=32)
    records = [pickle.loads(r["payload"]) for r in executor.read_unit(item, preprocess, 3, os.getcwd())]
    assert [sum(len(m["meta"]) for m in record if "end" not in m) for record in records] == images
    assert [any("end" in m for m in record) for record in records] == [False] * (len(images) - 1) + [True]
    assert "end" in records[-1][-1] and records[-1][-1]["count"] == 19 and not records[-1][-1]["errors"]
    orders = [meta["order"] for record in records for m in record if "end" not in m for meta in m["meta"]]
    assert orders == list(range(19))


@pytest.mark.slow
def test_a_unit_of_several_records_gives_the_local_executors_rows_and_bytes(tmp_path, ray_address):
    ckpt = write_generator(tmp_path / "g.pt", ngf=8, n_blocks=2)
    src = image_folder(tmp_path / "in", 19, size=(32, 32))
    args = ["--checkpoint", ckpt, "--input", str(src), "--unit-size", "19", "--batch-size", "3",
            "--crop-size", "32"]
    assert infer_here(*args, "--out", str(tmp_path / "local")).returncode == 0
    ray = infer_here(*args, "--out", str(tmp_path / "ray"), "--executor", "ray", "--ray-address", ray_address)
    assert ray.returncode == 0, ray.stderr
    assert comparable(str(tmp_path / "ray")) == comparable(str(tmp_path / "local"))
    assert pq.read_table(str(tmp_path / "ray" / "manifest")).num_rows == 19
    same_files(tmp_path / "local" / "images", tmp_path / "ray" / "images", "*.png")


@pytest.mark.slow
def test_ray_gives_the_local_executors_table_parts(tmp_path, ray_address):
    """--format table: the encoded images come back to the driver with their unit's rows, which
    writes the same table parts (images and rows) as the local executor."""
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 3, bad=True)
    args = ["--checkpoint", ckpt, "--input", str(src), "--unit-size", "2", "--batch-size", "2",
            "--format", "table"]
    assert infer_here(*args, "--out", str(tmp_path / "local")).returncode == 0
    ray = infer_here(*args, "--out", str(tmp_path / "ray"), "--executor", "ray", "--ray-address", ray_address)
    assert ray.returncode == 0, ray.stderr
    images = [pq.read_table(tmp_path / out / "table").sort_by("key").select(["key", "image"]).to_pylist()
              for out in ("local", "ray")]
    assert images[0] == images[1] and {r["image"] is None for r in images[0]} == {True, False}
    assert comparable(str(tmp_path / "ray")) == comparable(str(tmp_path / "local"))


@pytest.mark.slow
def test_device_cuda_on_a_cluster_without_gpus_exits_2(tmp_path, ray_address):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 1)
    done = infer_here("--checkpoint", ckpt, "--input", str(src), "--out", str(tmp_path / "out"),
                      "--executor", "ray", "--ray-address", ray_address, "--device", "cuda")
    assert done.returncode == 2 and f"the Ray cluster at {ray_address} has no GPUs" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreachable_cluster_exits_1_in_one_line_naming_it(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 1)
    address = f"127.0.0.1:{free_ports(1)[0]}"
    done = infer_here("--checkpoint", ckpt, "--input", str(src), "--out", str(tmp_path / "out"),
                      "--executor", "ray", "--ray-address", address)
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert done.returncode == 1 and len(errors) == 1, done.stderr
    assert f"the Ray cluster at {address} is unreachable" in errors[0]
    assert not (tmp_path / "out").exists()


def test_without_ray_installed_the_ray_executor_exits_2_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 1)
    done = infer_here("--checkpoint", ckpt, "--input", str(src), "--out", str(tmp_path / "out"),
                      "--executor", "ray")
    assert done.returncode == 2 and "pip install 'cut-pipeline[ray]'" in done.stderr


@pytest.mark.parametrize("version", ["2.40.0", "2.64.0", "3.0.0rc1"])
def test_a_ray_outside_the_supported_versions_exits_2_naming_them(tmp_path, monkeypatch, version):
    """Ray 2.40 had no way to call on an actor's main thread, Ray 2.64 drops the retry options the
    executor sets: a Ray outside 2.53-2.63 is refused in one line before anything starts."""
    import ray

    monkeypatch.setattr(ray, "__version__", version)
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 1)
    done = infer_here("--checkpoint", ckpt, "--input", str(src), "--out", str(tmp_path / "out"),
                      "--executor", "ray")
    assert done.returncode == 2
    assert f"needs Ray 2.53 to below 2.64, found {version}: pip install 'cut-pipeline[ray]'" in done.stderr
    assert not (tmp_path / "out" / "manifest").exists()
