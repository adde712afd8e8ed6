"""Ingest (`python -m jobs.shard`, pipeline.ingest) and shard sets (pipeline.shards)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import image_bytes, png_bomb
from inprocess import run_main

from jobs import shard as shard_job
from pipeline import storage
from pipeline.ingest import KeyCollisionError, OutputExistsError, build_shards
from pipeline.keys import path_key as sample_key
from pipeline.shards import ShardIndex, ShardIndexNotFoundError, iter_shard


def _samples(out: str) -> dict[str, dict]:
    index = ShardIndex.load(out)
    return {str(s["__key__"]): s for shard in index.shards for s in iter_shard(index.url(shard))}


def _rejects(out: str) -> dict[str, str]:
    lines = storage.read_bytes(storage.join(out, "_rejects.jsonl")).decode().splitlines()
    return {Path(r["source_url"]).name: r["reason"] for r in map(json.loads, lines)}


def test_cli_ingests_a_folder_to_s3_and_streams_it_back(make_images: Callable[..., Path],
                                                         s3_url: str) -> None:
    folder = make_images("trainA", 7)
    originals = {sample_key(str(p.relative_to(folder))): p.read_bytes() for p in folder.rglob("*.jpg")}
    run = run_main(shard_job.main, str(folder), "--out", s3_url, "--prefix", "a", "--domain", "A",
                   "--max-count", "3", "--no-progress")  # in this process (tests/inprocess.py)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert (summary["samples"], summary["shards"], summary["rejects"]) == (7, 3, 0)
    index = ShardIndex.load(storage.join(s3_url, "_index.json"))
    assert [(s.name, s.samples) for s in index.shards] == [("a-000000.tar", 3), ("a-000001.tar", 3),
                                                           ("a-000002.tar", 1)]
    assert [len(storage.read_bytes(index.url(s))) for s in index.shards] == [s.bytes for s in index.shards]
    samples = _samples(s3_url)
    assert {k: s["jpg"] for k, s in samples.items()} == originals
    meta = json.loads(samples["part0/img-000"]["json"])
    assert meta["source_url"] == str(folder / "part0" / "img-000.jpg")
    assert (meta["width"], meta["height"], meta["domain"], meta["format"]) == (48, 40, "A", "JPEG")
    assert meta["bytes"] == len(originals["part0/img-000"])
    assert meta["sha256"] == hashlib.sha256(originals["part0/img-000"]).hexdigest()


def test_webdataset_reads_s3_shards_through_the_registered_opener(make_images: Callable[..., Path],
                                                                   s3_url: str) -> None:
    build_shards([str(make_images("a", 4))], s3_url, progress=False)
    dataset = wds.WebDataset(storage.join(s3_url, "shard-000000.tar"), shardshuffle=False)
    keys = [s["__key__"] for s in dataset]
    assert sorted(keys) == ["part0/img-000", "part0/img-002", "part1/img-001", "part1/img-003"]


def test_bad_files_are_rejected_with_reasons(make_images: Callable[..., Path], tmp_path: Path) -> None:
    folder = make_images("mixed", 3)
    good = image_bytes(10)
    png = image_bytes(11, fmt="PNG")
    bad = {"empty.jpg": b"", "notes.png": b"plain text, no pixels", "half.jpg": good[: len(good) // 2],
           "broken.png": png[:100] + bytes(50) + png[150:], "huge.png": image_bytes(12, (64, 64), fmt="PNG"),
           "bomb.png": png_bomb()}
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    (folder / "readme.txt").write_text("not listed: folders take image extensions only")
    out = str(tmp_path / "out")
    summary = build_shards([str(folder)], out, max_pixels=48 * 40, progress=False)
    assert (summary.samples, summary.rejects) == (3, 6)
    assert _rejects(out) == {"empty.jpg": "empty", "notes.png": "not-an-image", "half.jpg": "truncated",
                             "broken.png": "corrupt", "huge.png": "too-large", "bomb.png": "too-large"}
    assert sorted(_samples(out)) == ["part0/img-000", "part0/img-002", "part1/img-001"]
    assert ShardIndex.load(out).extra["rejects"] == 6


def test_shards_respect_the_byte_limit(make_images: Callable[..., Path], tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    build_shards([str(make_images("a", 6))], out, max_size=12_000, progress=False)
    index = ShardIndex.load(out)
    assert index.samples == 6 and len(index.shards) > 1
    assert all(s.bytes <= 12_000 + 10_240 for s in index.shards)  # tar end padding is not counted ahead


def test_every_key_collision_is_named_in_one_run(tmp_path: Path) -> None:
    folder = tmp_path / "src"
    folder.mkdir()
    for name in ("cat.jpg", "cat.png", "dog.jpg", "dog.webp", "a.b.jpg", "a_b.jpg"):
        (folder / name).write_bytes(image_bytes(1))
    with pytest.raises(KeyCollisionError, match="3 sample key collision") as caught:
        build_shards([str(folder)], str(tmp_path / "out"), progress=False)
    message = str(caught.value)
    assert all(f"-> '{key}'" in message for key in ("cat", "dog", "a_b")) and "cat.png" in message
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_overwrite(make_images: Callable[..., Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out")
    assert shard_job.main([str(make_images("a", 5)), "--out", out, "--max-count", "2", "--no-progress"]) == 0
    assert shard_job.main([str(make_images("b", 1)), "--out", out, "--no-progress"]) == 2
    assert "already holds a shard set" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        build_shards([str(make_images("b", 1))], out, progress=False)
    assert shard_job.main([str(make_images("b", 1)), "--out", out, "--overwrite", "--no-progress"]) == 0
    names = sorted(p.name for p in Path(out).iterdir())
    assert names == ["_index.json", "_rejects.jsonl", "shard-r2-000000.tar"]  # beside the old, then switched
    assert ShardIndex.load(out).samples == 1


def test_globs_and_url_lists_are_sources(make_images: Callable[..., Path], tmp_path: Path) -> None:
    folder = make_images("a", 6)
    listed = sorted(str(p) for p in folder.rglob("*.jpg"))
    (tmp_path / "urls.txt").write_text("# two images\n" + "\n".join(listed[:2]) + "\n")
    pq.write_table(pa.table({"url": listed[2:4]}), tmp_path / "urls.parquet")
    out = str(tmp_path / "out")
    build_shards([str(tmp_path / "urls.txt"), str(tmp_path / "urls.parquet")], out, progress=False)
    assert len(_samples(out)) == 4
    glob_out = str(tmp_path / "glob")
    build_shards([str(folder / "part1" / "*.jpg")], glob_out, progress=False)
    assert sorted(_samples(glob_out)) == ["img-001", "img-003", "img-005"]


def test_missing_index_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ShardIndexNotFoundError, match=r"no shard index at .*_index\.json"):
        ShardIndex.load(str(tmp_path))
