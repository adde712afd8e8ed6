"""jobs.infer on a data lake as it is: hostile keys, idle workers, changing listings, collisions,
big shards, device OOM, SIGTERM, and outputs that chain. Each test is a failure a user met."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import duckdb
import pytest
import torch
from conftest import image_bytes
from PIL import Image
from test_infer import ROOT, image_folder, infer, infer_here, write_generator

from jobs import infer as infer_job
from jobs.translator import Translator, finish
from pipeline.ingest import build_shards
from pipeline.manifest import read_manifest
from pipeline.plan import load_plan, worker_units
from pipeline.shards import ShardIndex, iter_shard


def run(*args: str) -> int:
    """jobs.infer in this process (real job, no subprocess start-up)."""
    return infer_job.main(["--no-progress", "--crop-size", "32", "--workers", "0", *args])


def write_shard_set(root: Path, members: list[tuple[str, bytes]], samples: int | None = None,
                    name: str = "s-000000.tar") -> Path:
    """A shard set written by someone else: a tar with these member names, added to the set's index
    (`samples`: what the index claims, by default the member count)."""
    root.mkdir(parents=True, exist_ok=True)
    tar_path = root / name
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    count = samples if samples is not None else len(members)
    index_path = root / "_index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"shards": []}
    index["shards"].append({"name": name, "samples": count, "bytes": tar_path.stat().st_size})
    index_path.write_text(json.dumps(index))
    return root


def rows_by_key(out: Path) -> dict[str, dict]:
    rows = read_manifest(str(out)).to_pylist()
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)), "keys are unique over the manifest"
    return {r["key"]: r for r in rows}


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def assert_rows_match_outputs(out: Path) -> None:
    """Every ok row's output exists, and its bytes hash to the row's output_sha256."""
    import hashlib

    for row in read_manifest(str(out)).to_pylist():
        if row["status"] == "ok":
            url = row["output_url"]
            if "#" in url:
                tar_url, _, member = url.partition("#")
                with tarfile.open(tar_url) as tar:
                    data = tar.extractfile(member).read()
            else:
                data = Path(url).read_bytes()
            assert hashlib.sha256(data).hexdigest() == row["output_sha256"], url


# ------------------------------------------------------------------------------------------ keys
@pytest.mark.parametrize("fmt", ["files", "shards"])
def test_hostile_member_names_become_error_rows_and_nothing_is_written_outside_out(tmp_path, fmt):
    ckpt = write_generator(tmp_path / "g.pt")
    png = image_bytes(1, (40, 40), fmt="PNG")
    hostile = ["../../../../escape.png", "/srv/escape2.png", "a\\..\\escape3.png", "ctl\x01name.png",
               "dir/../../escape4.png", "./dot.png", "a//b.png"]
    names = [*hostile, "fine.png", "odd#?:*.png"]
    src = write_shard_set(tmp_path / "lake" / "set", [(n, png) for n in names])
    out = tmp_path / "lake" / "jobs" / "out"
    before = files_under(tmp_path)
    assert run("--checkpoint", ckpt, "--input", str(src), "--out", str(out), "--format", fmt) == 0
    created = files_under(tmp_path) - before
    assert created and all(out in p.parents for p in created), sorted(map(str, created - set(out.rglob("*"))))
    assert not Path("/srv/escape2.png").exists()
    rows = rows_by_key(out)
    errors = [r for r in rows.values() if r["status"] == "error"]
    assert len(errors) == len(hostile) and {r["error"] for r in errors} == {"unsafe-key"}
    assert all(r["output_url"] is None for r in errors)
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert ok == {"s-000000.tar/fine", "s-000000.tar/odd____"}
    assert_rows_match_outputs(out)
    if fmt == "shards":
        with tarfile.open(out / "shards" / "part-000000.tar") as tar:
            names = tar.getnames()
        assert all(not n.startswith("/") and ".." not in n.split("/") for n in names)


def test_key_collisions_in_a_folder_and_across_shards_keep_every_output(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["a.jpg", "a.png", "a_2.jpg", "a~2.jpg"]):
        (folder / name).write_bytes(image_bytes(i, (40, 36), fmt="PNG" if name.endswith("png") else "JPEG"))
    out = tmp_path / "out"
    assert run("--checkpoint", ckpt, "--input", str(folder), "--out", str(out), "--unit-size", "2") == 0
    rows = rows_by_key(out)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    assert len({r["output_url"] for r in rows.values()}) == 4
    assert_rows_match_outputs(out)

    # the same keys in two shards of one set, and two sets whose shards share names
    sets = []
    for s in range(2):
        for shard in range(2):
            seeds = (10 * s + 3 * shard + i for i in range(2))
            members = [(f"k{i}.png", image_bytes(seed, (40, 40), fmt="PNG")) for i, seed in enumerate(seeds)]
            write_shard_set(tmp_path / f"set{s}", members, name=f"s-{shard:06d}.tar")
        sets.append(str(tmp_path / f"set{s}"))
    out2 = tmp_path / "out2"
    assert run("--checkpoint", ckpt, "--input", *sets, "--out", str(out2), "--format", "shards") == 0
    rows = rows_by_key(out2)
    assert len(rows) == 8 and len({r["output_url"] for r in rows.values()}) == 8
    assert {k.split("/")[0] for k in rows} == {"s-000000.tar", "s-000001.tar", "s-000000.tar~2",
                                               "s-000001.tar~2"}
    assert_rows_match_outputs(out2)


def test_repeated_keys_inside_one_shard_are_allocated_the_same_way_by_every_unit(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    png = [image_bytes(i, (40, 40), fmt="PNG") for i in range(6)]
    members = [("x.png", png[0]), ("y.png", png[1]), ("x.png", png[2]), ("x.png", png[3]),
               ("x~2.png", png[4]), ("z", png[5])]  # z: no extension, a sample without an image
    src = write_shard_set(tmp_path / "set", members)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run("--checkpoint", ckpt, "--input", str(src), "--out", str(whole)) == 0
    assert run("--checkpoint", ckpt, "--input", str(src), "--out", str(split), "--unit-size", "2") == 0
    a, b = rows_by_key(whole), rows_by_key(split)
    assert set(a) == set(b) == {"s-000000.tar/" + k for k in ("x", "y", "x~2", "x~3", "x~2~2", "z")}
    assert {k: r["output_sha256"] for k, r in a.items()} == {k: r["output_sha256"] for k, r in b.items()}
    assert a["s-000000.tar/z"]["error"] == "no-image"


# -------------------------------------------------------------------------------------- workers
def test_idle_workers_exit_zero_and_finish_a_run_killed_before_success(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 2))
    out = tmp_path / "out"
    # more workers than units: worker 3 of 4, first on the scene, plans and has nothing to do
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out), "--worker-index", "3",
               "--num-workers", "4") == 0
    assert load_plan(str(out)) is not None and not (out / "manifest").exists()
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out), "--worker-index", "0",
               "--num-workers", "4") == 0
    (out / "_SUCCESS").unlink()  # killed after its last commit, before _SUCCESS
    idle = infer_here("--checkpoint", ckpt, "--input", src, "--out", str(out), "--workers", "2",
                      env={"JOB_COMPLETION_INDEX": "1", "JOB_COMPLETIONS": "2"})
    assert idle.returncode == 0, idle.stderr
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 2


@pytest.mark.slow
def test_torchrun_with_more_ranks_than_units_commits(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 2))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "jobs.infer", "--no-progress", "--crop-size", "32", "--checkpoint", ckpt, "--input", src,
           "--out", str(out), "--workers", "2"]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(read_manifest(str(out))) == 2 and (out / "_SUCCESS").exists()


def test_one_big_shard_is_shared_by_four_workers(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(tmp_path / "set")
    build_shards([str(image_folder(tmp_path / "in", 12))], src, max_count=10_000, progress=False)
    assert len(ShardIndex.load(src).shards) == 1
    out = tmp_path / "out"
    for worker in (0, 3, 1, 2):
        assert run("--checkpoint", ckpt, "--input", src, "--out", str(out), "--unit-size", "3",
                   "--worker-index", str(worker), "--num-workers", "4") == 0
    rows = rows_by_key(out)
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows.values())
    assert sorted({r["worker"] for r in rows.values()}) == [0, 1, 2, 3]
    assert sorted(k.split("/", 1)[1] for k in rows) == [f"img-{i:03d}" for i in range(12)]


@pytest.mark.slow
def test_workers_started_together_make_one_plan(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 8))
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", src, "--out", str(out), "--unit-size", "1", "--workers", "0"]
    workers = [subprocess.Popen(
        [sys.executable, "-m", "jobs.infer", "--no-progress", "--crop-size", "32", *args, "--worker-index",
         str(i), "--num-workers", "4"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
        stderr=subprocess.PIPE, text=True) for i in (3, 1, 2, 0)]
    assert [w.wait(180) for w in workers] == [0, 0, 0, 0], [w.stderr.read()[-2000:] for w in workers]
    assert len(list((out / "_plan").glob("r1-*"))) == 1 and not (out / "_plan" / "lock").exists()
    rows = rows_by_key(out)
    assert sorted(rows) == [f"img-{i:03d}" for i in range(8)]
    assert {r["unit"] % 4 for r in rows.values()} == {r["worker"] for r in rows.values()} == {0, 1, 2, 3}


def test_a_held_planning_lock_is_waited_for_with_a_timeout_and_a_dead_holder_is_replaced(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 2))
    out = tmp_path / "out"
    lock = out / "_plan" / "lock"
    lock.parent.mkdir(parents=True)
    alive = {"worker": 0, "host": socket.gethostname(), "pid": os.getpid(), "beat": 3}
    lock.write_text(json.dumps(alive))
    waited = infer("--checkpoint", ckpt, "--input", src, "--out", str(out), "--plan-timeout", "2")
    assert waited.returncode == 2 and "no plan at" in waited.stderr and "plan-timeout" in waited.stderr
    assert not (out / "manifest").exists()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    lock.write_text(json.dumps({**alive, "pid": int(gone.stdout)}))  # a planner that died on this host
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out), "--plan-timeout", "60") == 0
    assert len(read_manifest(str(out))) == 2 and not lock.exists()


def test_a_worker_reads_only_its_own_units_from_the_plan(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 10))
    out = tmp_path / "out"
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out), "--unit-size", "2",
               "--worker-index", "0", "--num-workers", "5") == 0
    plan = load_plan(str(out))
    assert plan is not None and plan.units == 5 and plan.items == 10
    mine = worker_units(plan, 2, 5)
    assert [u.index for u in mine] == [2] and mine[0].items is None  # items are read when the unit runs
    from pipeline.corpus import read_items

    assert [i.key for i in read_items(mine[0])] == ["img-004", "img-005"]


# ---------------------------------------------------------------------------------- plan identity
def test_a_rerun_after_the_listing_grew_refuses_then_adds_only_the_new_inputs(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    folder = image_folder(tmp_path / "in", 10)
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(folder), "--out", str(out), "--unit-size", "4"]
    assert run(*args) == 0
    parts = {p.name: p.read_bytes() for p in (out / "manifest").iterdir()}
    outputs = files_under(out / "images")
    for i in range(8):  # new files that sort before the old ones
        Image.new("RGB", (40, 40), (i, 0, 0)).save(folder / f"a-new-{i}.png")
    refused = infer_here(*args, "--workers", "0")
    assert refused.returncode == 2
    assert "8 new, 0 gone" in refused.stderr and "--add-new-inputs" in refused.stderr
    assert {p.name: p.read_bytes() for p in (out / "manifest").iterdir()} == parts
    assert files_under(out / "images") == outputs  # nothing written

    assert run(*args, "--skip-input-check") == 0  # the frozen plan only: still the 10 planned
    assert len(read_manifest(str(out))) == 10

    assert run(*args, "--add-new-inputs") == 0
    rows = rows_by_key(out)
    assert len(rows) == 18 and all(r["status"] == "ok" for r in rows.values())
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == 18
    assert run(*args) == 0  # the extended plan matches the listing again
    assert_rows_match_outputs(out)


def test_a_shard_set_that_grew_is_noticed_and_its_new_shards_added(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    png = [image_bytes(i, (40, 40), fmt="PNG") for i in range(4)]
    src = write_shard_set(tmp_path / "set", [("a.png", png[0]), ("b.png", png[1])])
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(src), "--out", str(out)]
    assert run(*args) == 0
    write_shard_set(src, [("a.png", png[2]), ("c.png", png[3])], name="s-000001.tar")
    refused = infer_here(*args, "--workers", "0")
    assert refused.returncode == 2 and "1 new, 0 gone" in refused.stderr and "s-000001.tar" in refused.stderr
    assert run(*args, "--add-new-inputs") == 0
    expected = [f"s-00000{n}.tar/{k}" for n, k in ((0, "a"), (0, "b"), (1, "a"), (1, "c"))]
    assert sorted(rows_by_key(out)) == expected


def test_unusable_listings_are_clear_errors(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe not utf-8\n")
    (tmp_path / "list.parquet").write_bytes(b"PAR1 but not really")
    for listing in ("list.txt", "list.parquet"):
        done = infer_here("--checkpoint", ckpt, "--input", str(tmp_path / listing), "--out",
                          str(tmp_path / "o"))
        assert done.returncode == 2 and "is not a usable list of URLs" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr


def test_a_rerun_with_another_model_or_options_exits_before_writing(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    other = write_generator(tmp_path / "other.pt", seed=1)
    src = str(image_folder(tmp_path / "in", 3))
    out = tmp_path / "out"
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out), "--unit-size", "2") == 0
    (out / "manifest" / "part-000001.parquet").unlink()  # a unit left to do
    before = {p: p.read_bytes() for p in files_under(out)}
    for argv, what in (
        (["--checkpoint", other], "model_sha256"),
        (["--checkpoint", ckpt, "--image-format", "jpg"], "image_format"),
        (["--checkpoint", ckpt, "--crop-size", "40"], "crop_size"),
    ):
        done = infer_here(*argv, "--input", src, "--out", str(out), "--workers", "0")
        assert done.returncode == 2 and what in done.stderr and "new --out" in done.stderr, done.stderr
        assert {p: p.read_bytes() for p in files_under(out)} == before
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out)) == 0
    assert len({r["model_id"] for r in read_manifest(str(out)).to_pylist()}) == 1


def test_an_output_inside_the_input_prefix_is_never_read_as_input(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    folder = image_folder(tmp_path / "in", 3)
    out = folder / "translated"
    args = ["--checkpoint", ckpt, "--input", str(folder), "--out", str(out)]
    assert run(*args) == 0
    assert run(*args) == 0  # the outputs now under the input prefix are not new inputs
    assert len(read_manifest(str(out))) == 3
    assert run("--checkpoint", ckpt, "--input", str(out / "images"), "--out", str(out)) == 2


def test_a_manifest_written_before_plans_is_not_mixed_with_a_new_plan(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 2))
    out = tmp_path / "out"
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out)) == 0
    shutil.rmtree(out / "_plan")
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out)) == 2


# ------------------------------------------------------------------------------------ faults
class OutOfMemoryAbove:
    """A generator stand-in for a device that holds at most `pixels` input pixels per batch."""

    def __init__(self, forward, pixels: int) -> None:
        self.forward, self.pixels = forward, pixels
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(x.shape))
        if x.shape[0] * x.shape[2] * x.shape[3] > self.pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.forward(x)


def test_out_of_memory_splits_the_batch_and_an_image_too_large_alone_becomes_an_error_row(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    folder = image_folder(tmp_path / "in", 9, size=(40, 40))
    Image.new("RGB", (96, 96), (9, 9, 9)).save(folder / "big.png")
    out = tmp_path / "out"
    argv = ["--no-progress", "--checkpoint", ckpt, "--input", str(folder), "--out", str(out),
            "--preprocess", "none", "--batch-size", "4", "--workers", "0"]
    config = infer_job.load_infer_config(infer_job.build_parser().parse_args(argv))
    translator = Translator(config)
    device = OutOfMemoryAbove(translator.translate.forward, pixels=2 * 40 * 40)
    translator.translate.forward = device
    from pipeline.planner import obtain_plan

    plan = obtain_plan(str(out), config.inputs, infer_job.job_identity(config, translator.model_sha256),
                       config.unit_size, worker=0)
    translator.run(worker_units(plan, 0, 1))
    assert finish(str(out), plan, translator.layout, translator.model_id)
    rows = rows_by_key(out)
    assert rows["big"]["status"] == "error" and rows["big"]["error"] == "too-large-for-device"
    assert "96x96" in rows["big"]["error_detail"]
    assert all(rows[f"img-{i:03d}"]["status"] == "ok" for i in range(9))
    # batches of 4, 4, 1: the first 4 fails and splits into 2 + 2; the second is cut to 2s at once
    assert device.calls.count((4, 3, 40, 40)) == 1 and device.calls.count((2, 3, 40, 40)) == 4
    assert_rows_match_outputs(out)


@pytest.mark.slow
def test_sigterm_commits_complete_units_exits_promptly_and_a_rerun_finishes(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt", ngf=16, n_blocks=4)
    src = str(image_folder(tmp_path / "in", 40, size=(64, 64)))
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", src, "--out", str(out), "--unit-size", "2", "--crop-size", "64",
            "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs.infer", "--no-progress", *args], cwd=ROOT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((out / "manifest").glob("part-*.parquet")) if (out / "manifest").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert proc.wait(60) == 143, proc.stderr.read()
    assert time.monotonic() - sent < 20
    committed = len(list((out / "manifest").glob("part-*.parquet")))
    assert 1 <= committed < 20 and not (out / "_SUCCESS").exists()
    assert len(read_manifest(str(out))) == 2 * committed
    assert infer_here(*args).returncode == 0
    assert sorted(rows_by_key(out)) == [f"img-{i:03d}" for i in range(40)]


# ---------------------------------------------------------------------------------- manifest
def test_error_codes_are_bare_and_queryable_and_files_are_readable_by_others(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = image_folder(tmp_path / "in", 2, bad=True)
    (src / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (src / "notes.txt").write_text("not an image by name: skipped and counted, never a row")
    out = tmp_path / "out"
    assert run("--checkpoint", ckpt, "--input", str(src), "--out", str(out), "--max-pixels", "50000") == 0
    manifest = f"{out}/manifest/*.parquet"
    truncated = duckdb.sql(f"select key from read_parquet('{manifest}') where error = 'truncated'").fetchall()
    assert truncated == [("truncated",)]
    codes = dict(duckdb.sql(f"select key, error from read_parquet('{manifest}') where status = 'error'")
                 .fetchall())
    assert codes.pop("corrupt") in ("corrupt", "not-an-image")  # a JPEG marker, then garbage
    assert codes == {"empty": "empty", "notes": "not-an-image", "huge": "too-large",
                     "truncated": "truncated", "photo": "unsupported-format"}
    details = dict(duckdb.sql(f"select key, error_detail from read_parquet('{manifest}')").fetchall())
    assert "exceeds 50000 pixels" in details["huge"] and details["img-000"] is None
    plan = load_plan(str(out))
    assert plan is not None and plan.inputs[0].skipped == 1
    for path in files_under(out):
        assert path.stat().st_mode & 0o044 == 0o044, path  # group and others can read


def test_gif_and_other_formats_behave_the_same_in_shard_and_infer(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    folder = tmp_path / "in"
    folder.mkdir()
    frames = [Image.new("RGB", (40, 40), c) for c in ((200, 10, 10), (10, 200, 10))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (40, 40), (5, 5, 200)).save(folder / "plain.bmp")
    (folder / "raw.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    shards = tmp_path / "shards"
    summary = build_shards([str(folder)], str(shards), progress=False)
    rejects = [json.loads(line) for line in (shards / "_rejects.jsonl").read_text().splitlines()]
    assert summary.samples == 2 and [r["reason"] for r in rejects] == ["unsupported-format"]
    members = {ext for shard in ShardIndex.load(str(shards)).shards
               for s in iter_shard(str(shards / shard.name)) for ext in s if not ext.startswith("__")}
    assert {"gif", "bmp"} <= members
    for source, out in ((folder, tmp_path / "from-folder"), (shards, tmp_path / "from-shards")):
        assert run("--checkpoint", ckpt, "--input", str(source), "--out", str(out)) == 0
        status = {k.rsplit("/", 1)[-1]: r["error"] or r["status"] for k, r in rows_by_key(out).items()}
        assert status["anim"] == "ok" and status["plain"] == "ok"
        assert status.get("raw", "unsupported-format") == "unsupported-format"


def test_shard_outputs_are_a_shard_set_that_jobs_read_back(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    src = str(image_folder(tmp_path / "in", 5, bad=True))
    out = tmp_path / "out"
    assert run("--checkpoint", ckpt, "--input", src, "--out", str(out), "--format", "shards",
               "--unit-size", "4") == 0
    index = ShardIndex.load(str(out / "shards"))
    assert index.samples == 6 == sum(r["status"] == "ok" for r in read_manifest(str(out)).to_pylist())
    index.check_complete()
    sample = next(iter_shard(index.url(index.shards[0])))
    meta = json.loads(sample["json"])
    assert meta["key"] == sample["__key__"] and meta["model_id"].startswith(ckpt) and "png" in sample
    again = tmp_path / "again"
    assert run("--checkpoint", ckpt, "--input", str(out / "shards"), "--out", str(again)) == 0
    assert [r["status"] for r in read_manifest(str(again)).to_pylist()] == ["ok"] * 6

    from pipeline.unpaired import ShardSequence

    sequence = ShardSequence.from_index(index, seed=0, stream=0)  # the training reader
    assert sum(1 for s in sequence.read(0, 0, 6) if s.data is not None) == 6


def test_lying_and_broken_indexes_are_clear_errors(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    png = image_bytes(1, (40, 40), fmt="PNG")
    more = write_shard_set(tmp_path / "more", [(f"k{i}.png", png) for i in range(3)], samples=2)
    out = tmp_path / "out"
    assert run("--checkpoint", ckpt, "--input", str(more), "--out", str(out)) == 0
    rows = rows_by_key(out)
    assert len(rows) == 3 and rows["s-000000.tar/k2"]["error"] == "shard-error"
    assert "beyond the 2 samples" in rows["s-000000.tar/k2"]["error_detail"]

    big = write_shard_set(tmp_path / "big", [("k.png", png)], samples=10**9)
    done = infer_here("--checkpoint", ckpt, "--input", str(big), "--out", str(tmp_path / "o-big"))
    assert done.returncode == 2 and "1000000000 samples cannot fit" in done.stderr

    for name, body, message in (
        ("json", "{not json", "is not valid JSON"),
        ("escape", json.dumps({"shards": [{"name": "../outside.tar", "samples": 1, "bytes": 10}]}), "'..'"),
        ("negative", json.dumps({"shards": [{"name": "a.tar", "samples": -3, "bytes": 10}]}), "non-negative"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "_index.json").write_text(body)
        done = infer_here("--checkpoint", ckpt, "--input", str(folder), "--out", str(tmp_path / f"o-{name}"))
        assert done.returncode == 2 and message in done.stderr and "_index.json" in done.stderr, done.stderr
