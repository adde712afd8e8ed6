"""Sample keys: derived from source paths, checked when they come from someone else's shards, unique.

Keys name outputs (``OUT/images/<input>/<key>.<ext>``, shard members ``<key>.<ext>``), so a key
must never leave its folder and two inputs must never share one:

- ``path_key``: a key from a path below a source root. Its alphabet is ``[A-Za-z0-9_-/]``: no dot
  (WebDataset reserves it for extensions), no ``~``; ``..``, ``.`` and empty segments cannot occur.
- ``member_key``: a key read from a shard member name, which anyone may have written. Absolute
  paths, ``..``, ``.`` or empty segments, backslashes and control characters (NUL included) raise
  ``UnsafeKeyError``; characters that mean something to URLs, globs or Windows become ``_``.
- ``shard_namespace``: the first segment of the keys of one input shard's samples.
- Keys have overlong path segments shortened to a prefix plus a hash of the whole segment.
- ``KeyAllocator``: first come keeps its key; a later duplicate gets ``~2``, ``~3``, ... (the first
  suffix not taken), so the result is unique and a pure function of the order of the keys.
"""

from __future__ import annotations

import hashlib
import posixpath
import re

MAX_SEGMENT = 120  # bytes; longer segments are shortened (file systems allow 255)
MAX_KEY = 768  # bytes; longer keys are unsafe (S3 keys allow 1024, with the output prefix)
_PATH_UNSAFE = re.compile(r"[^A-Za-z0-9_\-/]")
_MEMBER_ODD = re.compile(r'[#?*\[\]%:"<>|]')
_NAMESPACE_UNSAFE = re.compile(r"[^A-Za-z0-9_\-.]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class UnsafeKeyError(ValueError):
    """A key that would name a path outside its folder, or no path at all."""


def _shorten(segment: str) -> str:
    if len(segment.encode()) <= MAX_SEGMENT:
        return segment
    digest = hashlib.sha256(segment.encode()).hexdigest()[:16]
    head = segment.encode()[: MAX_SEGMENT - 17].decode(errors="ignore")
    return f"{head}-{digest}"


def path_key(relative_path: str) -> str:
    """Stable key from a path below its source root: extension dropped, characters outside
    ``[A-Za-z0-9_-/]`` (dots included) replaced by ``_``, empty segments dropped."""
    stem = posixpath.splitext(relative_path.strip("/"))[0]
    segments = [_shorten(s) for s in _PATH_UNSAFE.sub("_", stem).split("/") if s]
    return "/".join(segments) or "_"


def member_key(raw: str) -> str:
    """The key of a shard member as it may be used for an output; UnsafeKeyError says why not."""
    if not raw:
        raise UnsafeKeyError("empty key")
    if _CONTROL.search(raw):
        raise UnsafeKeyError("control character in key")
    if "\\" in raw:
        raise UnsafeKeyError("backslash in key")
    if raw.startswith("/"):
        raise UnsafeKeyError("absolute path")
    segments = raw.split("/")
    if ".." in segments:
        raise UnsafeKeyError("'..' segment")
    if any(s in ("", ".") for s in segments):
        raise UnsafeKeyError("empty or '.' segment")
    key = "/".join(_shorten(_MEMBER_ODD.sub("_", s)) for s in segments)
    check_length(key)
    return key


def shard_namespace(shard_name: str) -> str:
    """The key prefix of a shard's samples: one segment that holds a dot (``shard-000003.tar``), so it
    can never equal the first segment of a ``path_key``, nor hold another namespace."""
    segment = _shorten(_NAMESPACE_UNSAFE.sub("_", shard_name))
    if "." not in segment:
        segment += ".tar"
    return segment if segment.strip(".") else f"_{segment}"


def check_length(key: str) -> None:
    if len(key.encode()) > MAX_KEY:
        raise UnsafeKeyError(f"key longer than {MAX_KEY} bytes")


class KeyAllocator:
    """Hands out unique keys in order: a taken key gets the first free ``~N`` suffix (N >= 2)."""

    def __init__(self, taken: set[str] | None = None) -> None:
        self.taken: set[str] = set() if taken is None else taken

    def take(self, key: str) -> str:
        if key in self.taken:
            n = 2
            while f"{key}~{n}" in self.taken:
                n += 1
            key = f"{key}~{n}"
        self.taken.add(key)
        return key
