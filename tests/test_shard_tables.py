"""jobs.shard from tables: a Parquet dataset (pyarrow's, and a `datasets` Image export) or a Delta table
becomes a checked shard set for jobs.train in one command; bad rows become rejects naming their part
file and row, never samples."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import image_bytes
from inprocess import run_main

from jobs import shard as shard_job
from pipeline import storage
from pipeline.shards import ShardIndex, iter_shard


def shard_set(out: str) -> dict[str, dict]:
    """The set's samples by key, read back as jobs.train reads them (index, then each shard)."""
    index = ShardIndex.load(out)
    index.check_complete()
    return {str(s["__key__"]): s for shard in index.shards for s in iter_shard(index.url(shard))}


def rejects(out: str) -> list[dict]:
    text = storage.read_bytes(storage.join(out, "_rejects.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def shard(*args: str) -> tuple[int, str, str]:
    done = run_main(shard_job.main, "--no-progress", *args)
    return done.returncode, done.stdout, done.stderr


def write_pyarrow_table(folder: Path) -> dict[str, bytes]:
    """Two part files of (id, image, label) written by pyarrow; part 1 holds a null, an empty and an
    undecodable cell at rows 1, 2 and 3. Returns the good images by id."""
    folder.mkdir(parents=True)
    good = {f"horse-{i}": image_bytes(i) for i in range(5)}
    parts = [[("horse-0", good["horse-0"]), ("horse-1", good["horse-1"])],
             [("horse-2", good["horse-2"]), ("null", None), ("empty", b""), ("garbage", b"not an image"),
              ("horse-3", good["horse-3"]), ("horse-4", good["horse-4"])]]
    schema = pa.schema([("id", pa.string()), ("image", pa.binary()), ("label", pa.int64())])
    for n, rows in enumerate(parts):
        table = pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows],
                          "label": list(range(len(rows)))}, schema=schema)
        pq.write_table(table, folder / f"part-{n:05d}.parquet", row_group_size=3)
    return good


def test_a_pyarrow_table_becomes_a_shard_set_keyed_by_its_key_column_with_bad_rows_rejected(tmp_path):
    table = tmp_path / "horses"
    good = write_pyarrow_table(table)
    out = str(tmp_path / "set")
    code, stdout, stderr = shard(str(table), "--out", out, "--key-column", "id", "--domain", "A",
                                 "--max-count", "2")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["samples"], summary["rejects"], summary["shards"]) == (5, 3, 3)
    samples = shard_set(out)
    assert {k: s["jpg"] for k, s in samples.items()} == good  # the original bytes, keyed by id
    meta = json.loads(samples["horse-2"]["json"])
    part1 = str(table / "part-00001.parquet")
    assert (meta["source_url"], meta["domain"], meta["width"]) == (f"{part1}#0", "A", 48)
    assert sorted((r["file"], r["row"], r["reason"]) for r in rejects(out)) == [
        (part1, 1, "empty"), (part1, 2, "empty"), (part1, 3, "not-an-image")]


def test_a_datasets_image_export_shards_keyed_by_image_paths_or_row_positions(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    pil = Image.new("RGB", (40, 32), (200, 10, 10))  # stored by `datasets` as PNG bytes with no path
    images = [{"bytes": image_bytes(i), "path": f"trainA/h{i}.jpg"} for i in range(3)] + [pil]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    export = tmp_path / "export" / "data"
    export.mkdir(parents=True)
    datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3]}, features=features).to_parquet(
        str(export / "train-00000-of-00001.parquet"))
    out = str(tmp_path / "set")
    code, _, stderr = shard(str(export), "--out", out)
    assert code == 0, stderr
    samples = shard_set(out)
    assert sorted(samples) == ["train-00000-of-00001/000003", "trainA/h0", "trainA/h1", "trainA/h2"]
    assert samples["trainA/h1"]["jpg"] == image_bytes(1)
    assert Image.open(io.BytesIO(samples["train-00000-of-00001/000003"]["png"])).size == (40, 32)
    assert rejects(out) == []


def test_a_table_on_s3_shards_and_keys_that_repeat_get_suffixes(tmp_path, s3_url):
    rows = {"id": ["a", "b.jpg", "a", "b.jpg"], "image": [image_bytes(i) for i in range(4)]}
    local = tmp_path / "t.parquet"
    pq.write_table(pa.table(rows), local)
    storage.write_bytes_atomic(storage.join(s3_url, "lake", "t.parquet"), local.read_bytes())
    out = storage.join(s3_url, "set")
    code, _, stderr = shard(storage.join(s3_url, "lake", "t.parquet"), "--out", out, "--key-column", "id")
    assert code == 0, stderr
    samples = shard_set(out)
    images = rows["image"]
    assert {k: s["jpg"] for k, s in samples.items()} == {
        "a": images[0], "b_jpg": images[1], "a~2": images[2], "b_jpg~2": images[3]}


def test_a_table_that_cannot_be_read_as_asked_exits_2_before_writing(tmp_path):
    table = tmp_path / "two-images"
    table.mkdir()
    pq.write_table(pa.table({"a": [image_bytes(0)], "b": [image_bytes(1)]}), table / "p.parquet")
    out = tmp_path / "set"
    code, _, stderr = shard(str(table), "--out", str(out))
    assert code == 2 and "several image columns" in stderr and "a (binary), b (binary)" in stderr
    code, _, stderr = shard(str(table), "--out", str(out), "--image-column", "a", "--key-column", "nope")
    assert code == 2 and "'nope'" in stderr
    assert not out.exists()
    code, _, stderr = shard(str(table), "--out", str(out), "--image-column", "b")
    assert code == 0, stderr
    assert list(shard_set(str(out))) == ["p/000000"]


def test_a_parquet_list_of_urls_still_shards_the_files_it_names(make_images, tmp_path):
    files = sorted(str(p) for p in make_images("imgs", 2).rglob("*.jpg"))
    pq.write_table(pa.table({"url": files}), tmp_path / "urls.parquet")
    out = str(tmp_path / "set")
    code, stdout, stderr = shard(str(tmp_path / "urls.parquet"), "--out", out)
    assert code == 0, stderr
    assert json.loads(stdout)["samples"] == 2


def test_a_delta_table_shards_the_version_asked_for_and_a_vanished_version_exits_2(tmp_path):
    deltalake = pytest.importorskip("deltalake")
    table = tmp_path / "delta"
    first = pa.table({"id": ["h0", "h1"], "image": [image_bytes(0), image_bytes(1)]})
    deltalake.write_deltalake(str(table), first)
    deltalake.write_deltalake(str(table), pa.table({"id": ["h2"], "image": [b""]}), mode="append")
    out = tmp_path / "v0"
    code, stdout, stderr = shard(str(table), "--out", str(out), "--key-column", "id", "--table-version", "0")
    assert code == 0, stderr
    expected = {"h0": image_bytes(0), "h1": image_bytes(1)}
    assert {k: s["jpg"] for k, s in shard_set(str(out)).items()} == expected
    now = tmp_path / "now"
    code, stdout, stderr = shard(str(table), "--out", str(now), "--key-column", "id")
    assert code == 0, stderr
    assert (json.loads(stdout)["samples"], [r["reason"] for r in rejects(str(now))]) == (2, ["empty"])
    code, _, stderr = shard(str(table), "--out", str(tmp_path / "gone"), "--table-version", "7")
    assert code == 2 and "version 7" in stderr, stderr
    assert not (tmp_path / "gone").exists()


# ---------------------------------------------------------------------------------- training from tables
def test_a_training_stream_reads_a_frozen_table_split_over_ranks_skipping_bad_rows(tmp_path, monkeypatch):
    from pipeline.unpaired import FrozenTable, StreamPosition, UnpairedStream, freeze_source

    table = tmp_path / "horses"
    write_pyarrow_table(table)  # 8 rows in row groups of 3, 3, 2 (part 1) and 2 (part 0); 3 bad rows
    frozen = freeze_source(str(table), str(tmp_path / "run" / "data" / "a"))
    assert isinstance(frozen, FrozenTable) and len(frozen) == 8
    pq.write_table(pa.table({"id": ["late"], "image": [image_bytes(9)], "label": [0]}),
                   table / "part-00002.parquet")  # the table grows: a resumed run keeps its frozen rows
    again = freeze_source(str(table), str(tmp_path / "run" / "data" / "a"))
    assert again == frozen
    used, skipped = [], 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        stream = UnpairedStream(frozen, frozen, batch_size=2, seed=1, workers=0, shuffle_buffer=2,
                                load_size=36, crop_size=32)
        assert stream.steps_per_epoch == 2
        batches = list(stream.iterate(StreamPosition()))
        used += [k for b in batches for k in b["A_key"]]
        assert all(b["A"].shape == (2, 3, 32, 32) for b in batches)
        skipped += stream.skipped
    good = {"part-00000.parquet/000000", "part-00000.parquet/000001", "part-00001.parquet/000000",
            "part-00001.parquet/000004", "part-00001.parquet/000005"}
    assert len(used) == 8 and set(used) <= good and len(set(used)) >= 4
    assert skipped == 6  # the 3 bad rows, once in A and once in B (the same table)


@pytest.mark.slow
def test_jobs_train_trains_from_a_datasets_export_named_as_data_a(tmp_path):
    datasets = pytest.importorskip("datasets")
    from test_train import train_here

    features = datasets.Features({"image": datasets.Image()})
    for name, seed in (("a", 0), ("b", 50)):
        images = [{"bytes": image_bytes(seed + i, (40, 40)), "path": f"{name}{i}.jpg"} for i in range(4)]
        (tmp_path / name).mkdir()
        datasets.Dataset.from_dict({"image": images}, features=features).to_parquet(
            str(tmp_path / name / "train-00000-of-00001.parquet"))
    run = tmp_path / "run"
    done = train_here(str(tmp_path / "a"), str(tmp_path / "b"), str(run), "train.max_steps=2",
                      "train.checkpoint_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "data" / "a.table.json").exists() and (run / "checkpoints" / "latest").exists()
    assert "4 table rows" in done.stderr


def test_an_unreadable_row_group_rejects_every_row_its_footer_promised_and_a_schema_change_exits_2(tmp_path):
    """b.parquet's first row group (rows 0 and 1) is damaged; its second (row 2) still reads."""
    table = tmp_path / "t"
    table.mkdir()
    pq.write_table(pa.table({"image": [image_bytes(i) for i in range(4)]}), table / "a.parquet")
    pq.write_table(pa.table({"image": [image_bytes(i) for i in range(3)]}), table / "b.parquet",
                   row_group_size=2)
    broken = bytearray((table / "b.parquet").read_bytes())
    broken[4:60] = bytes(56)  # the first page header: the footer still promises 3 rows
    (table / "b.parquet").write_bytes(bytes(broken))
    out = str(tmp_path / "set")
    code, _, stderr = shard(str(table), "--out", out)
    assert code == 0, stderr
    assert len(shard_set(out)) == 5
    assert [(r["file"], r["row"], r["reason"]) for r in rejects(out)] == [
        (str(table / "b.parquet"), row, "read-error") for row in range(2)]
    pq.write_table(pa.table({"image": ["a string"]}), table / "c.parquet")
    code, _, stderr = shard(str(table), "--out", str(tmp_path / "other"))
    assert code == 2 and "c.parquet" in stderr and "'image'" in stderr, stderr
    assert not (tmp_path / "other").exists()


def test_a_delta_table_named_for_training_is_frozen_at_its_current_version(tmp_path):
    deltalake = pytest.importorskip("deltalake")
    from pipeline.unpaired import ShardSequence, freeze_source

    table = str(tmp_path / "delta")
    for i in range(2):
        deltalake.write_deltalake(table, pa.table({"image": [image_bytes(i)]}), mode="append")
    frozen = freeze_source(table, str(tmp_path / "run" / "data" / "b"))
    deltalake.write_deltalake(table, pa.table({"image": [image_bytes(5)]}), mode="append")
    again = freeze_source(table, str(tmp_path / "run" / "data" / "b"))
    assert again == frozen and frozen.spec.version == 1 and len(frozen) == 2
    rows = list(ShardSequence.from_table(frozen, seed=0, stream=0).read(0, 0, 2))
    assert sorted(r.data for r in rows) == sorted([image_bytes(0), image_bytes(1)])
