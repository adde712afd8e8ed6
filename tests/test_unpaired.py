"""Unpaired A/B streams (pipeline.unpaired): rank/worker splits, batch counts, corrupt samples, resume."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import image_bytes, png_bomb

from pipeline import storage
from pipeline.ingest import build_shards
from pipeline.shards import ShardIndex, ShardNotFoundError, ShardWriter
from pipeline.unpaired import StreamPosition, UnpairedStream

SIZES = {"load_size": 36, "crop_size": 32}


def _shard_set(url: str, samples: list[tuple[str, bytes]], max_count: int) -> str:
    """Write samples as given, unchecked (ingest would reject bad ones)."""
    writer = ShardWriter(url, "s-", max_count=max_count, max_size=1 << 30)
    for key, data in samples:
        writer.write(key, {"jpg": data, "json": b"{}"})
    ShardIndex(url, tuple(writer.close())).save()
    return url


def _good(prefix: str, n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i:03d}", image_bytes(seed + i)) for i in range(n)]


def _epoch(stream: UnpairedStream, epoch: int = 0, step: int = 0, decay: bool = False) -> list[dict]:
    return list(stream.iterate(StreamPosition(epoch, step), decay=decay))


def test_ranks_and_workers_see_disjoint_samples_covering_the_set(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    a = _shard_set(str(tmp_path / "a"), _good("a", 24), max_count=5)  # shards of 5, 5, 5, 5, 4
    b = _shard_set(str(tmp_path / "b"), _good("b", 10, seed=100), max_count=3)
    a_keys: list[str] = []
    b_keys: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        stream = UnpairedStream(a, b, batch_size=2, seed=3, workers=2, shuffle_buffer=4, **SIZES)
        batches = _epoch(stream)
        assert stream.steps_per_epoch == 6 and len(batches) == 6
        for batch in batches:
            assert batch["A"].shape == batch["B"].shape == (2, 3, 32, 32)
            assert batch["A"].dtype == torch.float32 and -1 <= batch["A"].min() <= batch["A"].max() <= 1
            a_keys += batch["A_key"]
            b_keys += batch["B_key"]
    assert sorted(a_keys) == [f"a{i:03d}" for i in range(24)]  # each A sample once over 2 ranks x 2 workers
    assert set(Counter(b_keys).values()) <= {2, 3} and len(Counter(b_keys)) == 10  # B cycles evenly


@pytest.mark.parametrize("workers", [0, 2])
def test_every_rank_yields_the_same_batch_count_on_uneven_shards(tmp_path: Path, workers: int) -> None:
    a = _shard_set(str(tmp_path / "a"), _good("a", 13), max_count=5)  # 5, 5, 3
    b = _shard_set(str(tmp_path / "b"), _good("b", 7), max_count=4)  # 4, 3
    counts = []
    for rank in range(3):
        stream = UnpairedStream(a, b, batch_size=2, seed=0, rank=rank, world_size=3, workers=workers, **SIZES)
        counts.append(len(_epoch(stream, decay=True)))
    assert counts == [2, 2, 2]


def test_epochs_reshuffle_and_seeds_repeat(tmp_path: Path) -> None:
    a = _shard_set(str(tmp_path / "a"), _good("a", 12), max_count=3)
    b = _shard_set(str(tmp_path / "b"), _good("b", 5), max_count=3)

    def keys(seed: int, epoch: int) -> list[str]:
        stream = UnpairedStream(a, b, batch_size=1, seed=seed, rank=0, world_size=1, **SIZES)
        return [k for batch in _epoch(stream, epoch) for k in batch["A_key"] + batch["B_key"]]

    assert keys(1, 0) == keys(1, 0)
    assert keys(1, 0) != keys(1, 1)
    assert keys(1, 0) != keys(2, 0)


def test_resume_from_saved_position_continues_without_replay(tmp_path: Path) -> None:
    bad = [("a-bad", b"not a jpeg at all")]
    a = _shard_set(str(tmp_path / "a"), _good("a", 9) + bad + _good("c", 2, seed=50), max_count=4)
    b = _shard_set(str(tmp_path / "b"), _good("b", 5), max_count=2)

    def stream() -> UnpairedStream:
        return UnpairedStream(a, b, batch_size=2, seed=7, rank=1, world_size=2, workers=2, shuffle_buffer=3,
                              **SIZES)

    full = _epoch(stream(), epoch=2)
    first = stream()
    consumed = []
    for batch in first.iterate(StreamPosition(2, 0)):
        consumed.append(batch)
        if len(consumed) == 1:  # killed after one step: odd, so workers swap roles on resume
            break
    state = first.state_dict(StreamPosition(2, len(consumed)))
    resumed_stream = stream()
    resumed = list(resumed_stream.iterate(resumed_stream.position_from_state(state)))
    assert len(full) == 3 and len(resumed) == 2
    for expected, got in zip(full, consumed + resumed, strict=True):
        assert expected["A_key"] == got["A_key"] and expected["B_key"] == got["B_key"]
        assert torch.equal(expected["A"], got["A"]) and torch.equal(expected["B"], got["B"])


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    good = image_bytes(1)
    bad = [("bad-empty", b""), ("bad-text", b"hello"), ("bad-half", good[: len(good) // 2]),
           ("bad-bomb", png_bomb())]
    a = _shard_set(str(tmp_path / "a"), _good("a", 4) + bad + _good("c", 4, seed=20), max_count=3)
    b = _shard_set(str(tmp_path / "b"), _good("b", 3), max_count=3)
    stream = UnpairedStream(a, b, batch_size=1, seed=0, rank=0, world_size=1, workers=2, **SIZES)
    with caplog.at_level(logging.WARNING, logger="pipeline.unpaired"):
        batches = _epoch(stream)
    assert len(batches) == stream.steps_per_epoch == 12
    assert stream.skipped == 4
    assert not {k for batch in batches for k in batch["A_key"]} & {key for key, _ in bad}
    for key, reason in [("bad-empty", "empty"), ("bad-text", "not-an-image"), ("bad-half", "truncated"),
                        ("bad-bomb", "too-large")]:
        assert any(key in r.message and reason in r.message for r in caplog.records)


def test_truncated_shard_is_read_up_to_the_damage(tmp_path: Path) -> None:
    a = _shard_set(str(tmp_path / "a"), _good("a", 8), max_count=4)
    b = _shard_set(str(tmp_path / "b"), _good("b", 2), max_count=2)
    tar = tmp_path / "a" / "s-000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 3])
    stream = UnpairedStream(a, b, batch_size=2, seed=0, rank=0, world_size=1, **SIZES)
    batches = _epoch(stream)
    assert len(batches) == 4 and stream.skipped >= 2


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    a = _shard_set(str(tmp_path / "a"), _good("a", 6), max_count=2)
    b = _shard_set(str(tmp_path / "b"), _good("b", 2), max_count=2)
    stream = UnpairedStream(a, b, batch_size=1, seed=0, rank=0, world_size=1, workers=1, **SIZES)
    (tmp_path / "a" / "s-000002.tar").unlink()
    with pytest.raises(ShardNotFoundError, match=r"s-000002\.tar"):
        _epoch(stream)
    with pytest.raises(ShardNotFoundError, match=r"1 shard\(s\) listed in .*_index\.json are missing: s-0+2"):
        UnpairedStream(a, b, batch_size=1, seed=0, rank=0, world_size=1, **SIZES)


def test_streams_back_a_folder_ingested_to_s3(make_images: Callable[..., Path], s3_url: str) -> None:
    a_url, b_url = storage.join(s3_url, "trainA"), storage.join(s3_url, "trainB")
    build_shards([str(make_images("trainA", 6))], a_url, max_count=2, progress=False)
    build_shards([str(make_images("trainB", 4, start_seed=50))], b_url, max_count=3, progress=False)
    stream = UnpairedStream(storage.join(a_url, "_index.json"), b_url, batch_size=1, seed=0, rank=0,
                            world_size=1, workers=2, **SIZES)
    batches = _epoch(stream)
    assert len(batches) == 6
    assert sorted(k for batch in batches for k in batch["A_key"]) == sorted(
        f"part{i % 2}/img-{i:03d}" for i in range(6))
