"""pipeline.storage on local paths, memory:// and a real S3-compatible server."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import storage


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = str(tmp_path / "deep" / "obj.bin")
    storage.write_bytes_atomic(target, b"first")
    storage.write_bytes_atomic(target, b"second")
    assert storage.read_bytes(target) == b"second"
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["obj.bin"]


def test_failed_local_upload_keeps_the_old_object(tmp_path: Path) -> None:
    target = str(tmp_path / "obj.bin")
    storage.write_bytes_atomic(target, b"old")
    with pytest.raises(FileNotFoundError):
        storage.upload_atomic(str(tmp_path / "no-such-source"), target)
    assert storage.read_bytes(target) == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["obj.bin"]


def test_list_files_recurses_globs_and_keeps_local_spelling(tmp_path: Path) -> None:
    for name in ("b/2.jpg", "a/1.jpg", "a/sub/3.png", "top.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    files = storage.list_files(str(tmp_path))
    assert files == sorted(files)
    names = [storage.relative(u, str(tmp_path)) for u in files]
    assert names == ["a/1.jpg", "a/sub/3.png", "b/2.jpg", "top.txt"]
    assert not files[0].startswith("file://")
    assert [Path(u).name for u in storage.list_files(str(tmp_path / "*" / "*.jpg"))] == ["1.jpg", "2.jpg"]
    with pytest.raises(FileNotFoundError):
        storage.list_files(str(tmp_path / "missing"))


def test_memory_urls_round_trip() -> None:
    url = storage.join("memory://storage-test", "x", "y.bin")
    storage.write_bytes_atomic(url, b"payload")
    assert storage.exists(url)
    assert storage.list_files("memory://storage-test") == [url.replace("memory://", "memory:///")]
    storage.remove(url)
    assert not storage.exists(url)


def test_s3_round_trip_through_environment_endpoint(s3_url: str, tmp_path: Path) -> None:
    obj = storage.join(s3_url, "dir", "obj.bin")
    storage.write_bytes_atomic(obj, b"hello")
    local = tmp_path / "big.bin"
    local.write_bytes(b"z" * 100_000)
    storage.upload_atomic(str(local), storage.join(s3_url, "dir", "big.bin"))
    assert storage.read_bytes(obj) == b"hello"
    assert storage.list_files(s3_url) == [storage.join(s3_url, "dir", n) for n in ("big.bin", "obj.bin")]
    with storage.open_read(storage.join(s3_url, "dir", "big.bin")) as stream:
        assert stream.read() == b"z" * 100_000
    storage.remove(obj)
    assert not storage.exists(obj)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(obj)


def test_retry_backs_off_on_transient_errors_only() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert storage.retry(flaky, what="flaky", base_delay=0.001) == "ok"
    assert len(calls) == 3

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("gone")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, what="missing", base_delay=0.001)
    assert len(calls) == 1


def test_join_and_dirname() -> None:
    assert storage.join("s3://b/set/", "_index.json") == "s3://b/set/_index.json"
    assert storage.join("/data/set", "a", "b.tar") == "/data/set/a/b.tar"
    assert storage.dirname("s3://b/set/_index.json") == "s3://b/set"


def test_an_endpoint_that_refuses_is_retried_then_named_in_one_error(monkeypatch) -> None:
    """botocore's EndpointConnectionError is no OSError: it is retried all the same, and a store that
    stays down ends in StorageUnreachableError naming the URL and the endpoint."""
    from botocore.exceptions import EndpointConnectionError

    monkeypatch.setattr(storage.time, "sleep", lambda _s: None)
    calls = []

    def refused() -> None:
        calls.append(1)
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:9/bucket/key?x=1")

    with pytest.raises(storage.StorageUnreachableError) as caught:
        storage.retry(refused, what="read s3://bucket/key", attempts=3)
    assert len(calls) == 3
    assert str(caught.value) == ("read s3://bucket/key: storage unreachable (http://127.0.0.1:9/bucket/key) "
                                 "after 3 tries")
    assert not isinstance(caught.value, OSError)  # never taken for one unreadable file

