"""Sample keys (pipeline.keys), member grouping of foreign tars, and output containment."""

from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.keys import MAX_SEGMENT, KeyAllocator, UnsafeKeyError, member_key, path_key, shard_namespace
from pipeline.shards import group_members


@pytest.mark.parametrize("raw", ["", "/etc/x", "../x", "a/../../x", "a/./b", "a//b", "a/", "a\\b", "a\x00b",
                                 "tab\tname", "del\x7f"])
def test_member_keys_that_could_leave_their_folder_are_unsafe(raw):
    with pytest.raises(UnsafeKeyError):
        member_key(raw)


def test_member_keys_keep_their_shape_and_lose_url_and_glob_characters():
    assert member_key("dir.v2/img-001") == "dir.v2/img-001"
    assert member_key("a#b?c*[d]%e:f") == "a_b_c__d__e_f"
    assert member_key("photo 1/été") == "photo 1/été"
    long = member_key("x" * 300)
    assert len(long.encode()) <= MAX_SEGMENT and long != member_key("x" * 301)


def test_path_keys_never_hold_dots_tildes_or_empty_segments():
    assert path_key("/a/b.c/img.jpg") == "a/b_c/img"
    assert path_key("a//../~x.png") == "a/__/_x"
    assert shard_namespace("sub/part.tar") == "sub_part.tar" and shard_namespace("noext") == "noext.tar"


def test_allocation_is_unique_and_first_come():
    keys = KeyAllocator()
    assert [keys.take(k) for k in ["a", "a", "a_2", "a~2", "a"]] == ["a", "a~2", "a_2", "a~2~2", "a~3"]


def test_foreign_tar_members_group_without_dropping_anything():
    members = [("a.jpg", b"1"), ("a.json", b"2"), ("a.jpg", b"3"), ("README", b"4"), ("__meta__", b"5"),
               ("b.seg.png", b"6"), (".hidden.jpg", b"7")]
    samples = list(group_members("u", members))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("a", ["jpg", "json"]), ("a", ["jpg"]), ("README", []), ("b", ["seg.png"]), (".hidden.jpg", [])]


def test_within_resolves_dot_dot_and_compares_stores():
    inside = storage.within("/data/out")
    assert inside("/data/out/images/0/a.png") and inside("/data/out")
    assert not inside("/data/out/../elsewhere") and not inside("/data/outside") and not inside("s3://data/out/x")
    on_s3 = storage.within("s3://bucket/out/")
    assert on_s3("s3://bucket/out/a") and not on_s3("s3://bucket/out/../b") and not on_s3("gs://bucket/out/a")
