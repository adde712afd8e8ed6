"""jobs.infer on tables of images: Parquet datasets written by pyarrow and by `datasets`, planned from
footers, with kept columns, bad cells as rows, broken part files as read-error rows, and reruns."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import image_bytes
from test_infer import infer_here, write_generator

from pipeline.manifest import read_manifest
from pipeline.plan import load_plan, make_plan, worker_units
from pipeline.tables import TablePart, row_ranges

GARBAGE = b"these bytes are no image at all"


def write_hive_table(root: Path, rows_per_part: int = 4, row_group_size: int = 2) -> Path:
    """Two part files under hive folders `label=horse/` and `label=zebra/`: a binary `img` column (row 1
    of the first part null, row 2 empty, row 3 garbage), an int32 `id` and a string `note`."""
    for p, label in enumerate(("horse", "zebra")):
        images: list[bytes | None] = [image_bytes(10 * p + i, fmt="PNG") for i in range(rows_per_part)]
        if p == 0:
            images[1:4] = [None, b"", GARBAGE]
        table = pa.table({
            "img": pa.array(images, pa.binary()),
            "id": pa.array([100 * p + i for i in range(rows_per_part)], pa.int32()),
            "note": [f"{label}-{i}" for i in range(rows_per_part)],
        })
        folder = root / f"label={label}"
        folder.mkdir(parents=True)
        pq.write_table(table, folder / f"part-{p}.parquet", row_group_size=row_group_size)
    (root / "_SUCCESS").write_bytes(b"")  # as Spark leaves it: not a part file
    return root


def write_datasets_table(path: Path, n: int = 3) -> Path:
    """A table saved by `datasets` itself: an Image feature (struct of bytes and path) and a label."""
    datasets = pytest.importorskip("datasets")
    images = [{"bytes": image_bytes(i, fmt="PNG"), "path": f"horse-{i:02d}.png"} for i in range(n)]
    ds = datasets.Dataset.from_dict({"image": images, "label": list(range(n))})
    ds = ds.cast_column("image", datasets.Image())
    ds.to_parquet(str(path))
    return path


def zero_data_pages(path: Path) -> None:
    """Overwrite everything between the magic and the footer: the footer (sizes, rows, row groups,
    schema) stays readable, no page is."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    data[4:len(data) - 8 - footer] = bytes(len(data) - 12 - footer)
    path.write_bytes(bytes(data))


def by_key(out: Path) -> dict[str, dict]:
    rows = read_manifest(str(out)).to_pylist()
    assert len({r["key"] for r in rows}) == len(rows), "keys are unique"
    return {r["key"]: r for r in rows}


def test_a_hive_table_gets_one_row_per_table_row_with_its_kept_columns(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    table = write_hive_table(tmp_path / "table")
    out = tmp_path / "out"
    done = infer_here("--checkpoint", ckpt, "--input", str(table), "--out", str(out), "--workers", "1",
                      "--unit-size", "3", "--keep-columns", "label,id")  # rows cross a DataLoader process
    assert done.returncode == 0, done.stderr
    assert "ok 5, errors 3" in done.stdout
    rows = by_key(out)
    names = ("label_horse_part-0.parquet", "label_zebra_part-1.parquet")
    assert sorted(rows) == [f"{name}/{i:06d}" for name in names for i in range(4)]
    first = "label_horse_part-0.parquet"
    assert rows[f"{first}/000001"]["error"] == "empty" and "null" in rows[f"{first}/000001"]["error_detail"]
    assert rows[f"{first}/000002"]["error"] == "empty"
    assert rows[f"{first}/000003"]["error"] == "not-an-image"
    assert rows[f"{first}/000003"]["source_url"] == f"{table}/label=horse/part-0.parquet#3"
    # kept columns ride along on every row, error rows included, with the table's types
    assert all(r["label"] == k.split("_")[1] for k, r in rows.items())
    assert rows[f"{first}/000002"]["id"] == 2 and rows["label_zebra_part-1.parquet/000003"]["id"] == 103
    schema = pq.read_schema(out / "manifest" / "part-000000.parquet")
    assert schema.field("id").type == pa.int32() and schema.field("label").type == pa.string()
    assert schema.names[-2:] == ["label", "id"]
    # units are whole row groups (2 rows each) of one part: at most --unit-size 3 rows, so 2 rows each
    plan = load_plan(str(out))
    assert plan is not None and plan.inputs[0].kind == "table" and plan.units == 4 and plan.items == 8
    units = worker_units(plan, 0, 1)
    assert [(u.start, u.stop, u.row_groups) for u in units[:2]] == [(0, 2, (0, 1)), (2, 4, (1, 2))]
    ok = rows[f"{first}/000000"]
    assert ok["status"] == "ok" and Path(ok["output_url"]).is_file()


def test_row_groups_are_never_split_unless_larger_than_a_unit():
    part = TablePart("p.parquet", "p.parquet", 1, 24, (10, 3, 3, 7, 1))
    assert row_ranges(part, 4) == [(0, 4), (4, 8), (8, 10), (10, 13), (13, 16), (16, 20), (20, 23), (23, 24)]
    assert row_ranges(part, 100) == [(0, 24)]
    assert row_ranges(TablePart("p", "p", 1, 5, (1, 1, 1, 1, 1)), 2) == [(0, 2), (2, 4), (4, 5)]


def test_a_datasets_export_is_keyed_by_its_image_paths(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    table = write_datasets_table(tmp_path / "horses.parquet")
    out = tmp_path / "out"
    done = infer_here("--checkpoint", ckpt, "--input", str(table), "--out", str(out), "--workers", "0",
                      "--keep-columns", "label")
    assert done.returncode == 0, done.stderr
    rows = by_key(out)
    assert sorted(rows) == [f"horses.parquet/horse-{i:02d}" for i in range(3)]
    assert all(r["status"] == "ok" for r in rows.values())
    assert [rows[f"horses.parquet/horse-{i:02d}"]["label"] == i for i in range(3)] == [True] * 3


@pytest.mark.slow
def test_a_datasets_export_on_s3_with_a_key_column(tmp_path, s3_url):
    ckpt = write_generator(tmp_path / "g.pt")
    local = write_datasets_table(tmp_path / "horses.parquet", n=2)
    fs = s3fs.S3FileSystem()
    fs.put_file(str(local), f"{s3_url}/table/train-00000-of-00001.parquet")
    out = f"{s3_url}/out"
    done = infer_here("--checkpoint", ckpt, "--input", f"{s3_url}/table/", "--out", out, "--workers", "0",
                      "--key-column", "label")
    assert done.returncode == 0, done.stderr
    rows = read_manifest(out).to_pylist()
    assert sorted(r["key"] for r in rows) == [f"train-00000-of-00001.parquet/{i}" for i in range(2)]
    assert all(r["status"] == "ok" and r["output_url"].startswith(out) for r in rows)


def test_tables_that_cannot_be_read_as_asked_exit_2_naming_file_and_column(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    two = tmp_path / "two.parquet"
    pq.write_table(pa.table({"a": [b"x"], "b": pa.array([b"y"], pa.large_binary()), "n": [1]}), two)
    differs = tmp_path / "differs"
    differs.mkdir()
    pq.write_table(pa.table({"img": [b"x"], "n": [1]}), differs / "part-0.parquet")
    pq.write_table(pa.table({"img": ["a string"], "n": [1]}), differs / "part-1.parquet")
    cases = [
        ([str(two)], ["several image columns", "a (binary)", "b (large_binary)"]),
        ([str(two), "--image-column", "n"], ["column 'n' is int64", "two.parquet"]),
        ([str(differs)], ["part-1.parquet", "column 'img' is string", "part-0.parquet has binary"]),
        ([str(two), "--image-column", "a", "--keep-columns", "status"], ["'status'", "manifest"]),
        ([str(two), "--image-column", "a", "--keep-columns", "nope"], ["'nope'", "no such column"]),
    ]
    for argv, words in cases:
        out = tmp_path / "out"
        done = infer_here("--checkpoint", ckpt, "--out", str(out), "--input", *argv)
        assert done.returncode == 2, (argv, done.stderr)
        assert all(w in done.stderr for w in words), (words, done.stderr)
        assert "Traceback" not in done.stderr and not out.exists()


def test_planning_reads_footers_only_and_an_unreadable_part_gives_its_footers_rows(tmp_path):
    table = write_hive_table(tmp_path / "table", rows_per_part=5)
    zero_data_pages(table / "label=horse" / "part-0.parquet")  # no page of it can be read
    plan = make_plan(str(tmp_path / "planned"), [str(table)], {}, 100)
    assert plan.items == 10 and plan.units == 2  # planned from the footers alone
    globbed = make_plan(str(tmp_path / "globbed"), [f"{table}/label=*/*.parquet"], {}, 100)
    assert globbed.items == 10 and globbed.inputs[0].kind == "table"
    ckpt = write_generator(tmp_path / "g.pt")
    out = tmp_path / "out"
    done = infer_here("--checkpoint", ckpt, "--input", str(table), "--out", str(out), "--workers", "0",
                      "--keep-columns", "label")
    assert done.returncode == 0, done.stderr
    rows = by_key(out)
    broken = [r for r in rows.values() if "horse" in r["key"]]
    assert len(broken) == 5 and {r["error"] for r in broken} == {"read-error"}
    assert {r["label"] for r in broken} == {"horse"}  # partition values survive the unreadable file
    assert sum(r["status"] == "ok" for r in rows.values()) == 5


def test_a_part_truncated_after_planning_gives_read_error_rows_for_every_planned_row(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    table = write_hive_table(tmp_path / "table")
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(table), "--out", str(out), "--workers", "0", "--unit-size",
            "4", "--num-workers", "2"]
    assert infer_here(*args, "--worker-index", "1").returncode == 0  # plans; does unit 1 (part-1)
    part = table / "label=horse" / "part-0.parquet"
    part.write_bytes(part.read_bytes()[:100])
    refused = infer_here(*args, "--worker-index", "0")  # worker 0 relists: that footer is gone
    assert refused.returncode == 2 and "part-0.parquet: no readable Parquet footer" in refused.stderr
    done = infer_here(*args, "--worker-index", "0", "--skip-input-check")
    assert done.returncode == 0, done.stderr
    rows = by_key(out)
    assert len(rows) == 8
    assert [r["error"] for k, r in sorted(rows.items()) if "horse" in k] == ["read-error"] * 4


def test_a_rerun_skips_committed_units_and_adds_new_part_files_when_asked(tmp_path):
    ckpt = write_generator(tmp_path / "g.pt")
    table = write_hive_table(tmp_path / "table")
    out = tmp_path / "out"
    args = ["--checkpoint", ckpt, "--input", str(table), "--out", str(out), "--workers", "0",
            "--unit-size", "4"]
    assert infer_here(*args).returncode == 0
    parts = {p: p.stat().st_mtime_ns for p in (out / "manifest").iterdir()}
    again = infer_here(*args)
    assert again.returncode == 0 and "0 of 2 units to do" in again.stderr
    new = table / "label=zebra" / "part-2.parquet"
    pq.write_table(pa.table({"img": [image_bytes(99, fmt="PNG")], "id": pa.array([7], pa.int32()),
                             "note": ["new"]}), new)
    refused = infer_here(*args)
    assert refused.returncode == 2 and "1 new" in refused.stderr and "part-2.parquet" in refused.stderr
    added = infer_here(*args, "--add-new-inputs")
    assert added.returncode == 0, added.stderr
    assert "1 of 3 units to do" in added.stderr
    assert {p: p.stat().st_mtime_ns for p in parts} == parts  # committed units untouched
    rows = by_key(out)
    assert len(rows) == 9 and "label_zebra_part-2.parquet/000000" in rows
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows"] == 9 and success["units"] == 3


def test_a_parquet_list_of_urls_stays_a_listing(tmp_path):
    src = tmp_path / "img.png"
    src.write_bytes(image_bytes(1, fmt="PNG"))
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [str(src)]}), urls)
    plan = make_plan(str(tmp_path / "out"), [str(urls)], {}, 10)
    assert plan.inputs[0].kind == "listing" and plan.items == 1  # a string column is no image column


def test_a_delta_table_is_read_at_its_current_or_a_named_version(tmp_path):
    deltalake = pytest.importorskip("deltalake")
    pytest.importorskip("pipeline.delta")  # helper tableout's: the snapshot's files from the Delta log
    ckpt = write_generator(tmp_path / "g.pt")
    table = tmp_path / "delta"
    for version, labels in enumerate((["horse", "zebra"], ["zebra"])):
        rows = pa.table({"img": [image_bytes(10 * version + i, fmt="PNG") for i in range(len(labels))],
                         "label": labels})
        deltalake.write_deltalake(str(table), rows, partition_by=["label"], mode="append")
    common = ["--checkpoint", ckpt, "--input", str(table), "--workers", "0", "--keep-columns", "label"]
    old = tmp_path / "v0"
    done = infer_here(*common, "--out", str(old), "--table-version", "0")
    assert done.returncode == 0, done.stderr
    assert sorted(r["label"] for r in by_key(old).values()) == ["horse", "zebra"]
    plan = load_plan(str(old))
    assert plan is not None and plan.identity["table_version"] == 0 and plan.inputs[0].table["version"] == 0
    current = tmp_path / "current"
    done = infer_here(*common, "--out", str(current))
    assert done.returncode == 0, done.stderr
    rows = by_key(current)
    assert sorted(r["label"] for r in rows.values()) == ["horse", "zebra", "zebra"]
    assert all(r["status"] == "ok" and r["source_url"].startswith(f"{table}/label=") for r in rows.values())
    plan = load_plan(str(current))
    assert plan is not None and plan.inputs[0].table["version"] == 1  # the version actually read
    gone = infer_here(*common, "--out", str(tmp_path / "v7"), "--table-version", "7")
    assert gone.returncode == 2 and "version 7" in gone.stderr and not (tmp_path / "v7").exists()


@pytest.mark.slow
def test_storage_that_goes_down_raises_instead_of_giving_rows(tmp_path, s3_url, monkeypatch):
    """An unreachable store is not the table's fault: no read-error rows, the unit stays uncommitted."""
    import socket

    from pipeline import storage
    from pipeline.tables import open_table, table_samples

    table = write_hive_table(tmp_path / "table")
    s3fs.S3FileSystem().put(str(table), f"{s3_url}/table", recursive=True)
    opened = open_table(f"{s3_url}/table")
    assert opened.rows == 8 and [p.name for p in opened.parts] == ["label=horse/part-0.parquet",
                                                                    "label=zebra/part-1.parquet"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(storage.StorageUnreachableError):
        list(table_samples(opened, opened.parts[0]))
