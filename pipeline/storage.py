"""fsspec URLs: reads, atomic writes, listings and retries for local paths and object stores.

Every function takes a URL (`/path`, `file://`, `s3://`, `gs://`, `memory://`, ...). The S3 endpoint
and credentials come from the standard environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...),
so MinIO, Ceph or any S3-compatible store works without code changes.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import posixpath
import random
import shutil
import socket
import time
import uuid
from collections.abc import Callable
from typing import IO, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.registry import known_implementations
from fsspec.utils import get_protocol

log = logging.getLogger(__name__)

T = TypeVar("T")

LOCAL_PROTOCOLS = ("file", "local")
_GLOB_CHARS = "*?["
# Errors that retrying cannot fix; every other OSError (timeouts, resets, 5xx) is transient.
_PERMANENT = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
_PERMANENT_ERRNOS = frozenset({errno.ENOENT, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENOTDIR,
                               errno.EISDIR, errno.ENAMETOOLONG, errno.EROFS, errno.EEXIST, errno.ENOSPC,
                               errno.EDQUOT, errno.EBADF, errno.EINVAL})


class StorageUnreachableError(Exception):
    """The store behind a URL could not be reached (connection refused, no route, connect timeout),
    after the retries: the job's environment, so a later retry of the job may succeed.

    Not an OSError on purpose: callers that turn an unreadable file into a reject or an error row
    (``except OSError``) must not do so for every file while the store is down; the job ends instead.
    """

    def __init__(self, message: str, endpoint: str = "") -> None:  # one argument: DataLoader re-raises it
        super().__init__(message)
        self.endpoint = endpoint


def _botocore_types() -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """botocore's (HTTP trouble, connection failures), empty where botocore is not installed."""
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return (), ()
    return (HTTPClientError,), (BotoConnectionError,)


_BOTO_HTTP, _BOTO_CONNECT = _botocore_types()
# botocore's connection failures (EndpointConnectionError: the endpoint is down) are not OSErrors:
# without them here, a store that is down for a moment failed the first call without a retry.
_TRANSIENT = (OSError, *_BOTO_HTTP, *_BOTO_CONNECT)
_jitter = random.Random()  # private, so retries never disturb a seeded global `random`


def is_transient(exc: BaseException) -> bool:
    """Whether `exc` is worth retrying (network and server trouble, not missing or forbidden objects)."""
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, _PERMANENT)


def unreachable_endpoint(exc: BaseException) -> str | None:
    """The endpoint URL (or host:port) that `exc`, or an exception it came from, could not connect
    to; None if it is no connection failure."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageUnreachableError):
            return exc.endpoint
        if isinstance(exc, _BOTO_CONNECT):
            url = getattr(exc, "kwargs", {}).get("endpoint_url") or ""
            return url.split("?", 1)[0] or str(exc)
        if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def raise_if_unreachable(exc: BaseException, url: str) -> None:
    """StorageUnreachableError if `exc` is a connection failure found outside `retry` (a stream's read):
    the store is down, not the object at `url`."""
    endpoint = unreachable_endpoint(exc)
    if endpoint is not None:
        raise StorageUnreachableError(f"read {url}: storage unreachable ({endpoint})", endpoint) from exc


def _unreachable(what: str, exc: BaseException, attempts: int) -> StorageUnreachableError | None:
    endpoint = unreachable_endpoint(exc)
    if endpoint is None:
        return None
    return StorageUnreachableError(f"{what}: storage unreachable ({endpoint}) after {attempts} tries",
                                   endpoint)


def retry(fn: Callable[[], T], *, what: str, attempts: int = 5, base_delay: float = 0.2) -> T:
    """Call `fn`, retrying transient errors with jittered exponential backoff. A store that stays
    unreachable ends in one StorageUnreachableError naming `what` (the URL) and the endpoint."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == attempts:
                unreachable = _unreachable(what, exc, attempts)
                if unreachable is None:
                    raise
                raise unreachable from exc
            delay = min(base_delay * 2 ** (attempt - 1), 10.0) * (0.5 + _jitter.random())
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(exc).__name__, exc,
                        attempt, attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def storage_options(protocol: str) -> dict[str, object]:
    """Filesystem options taken from the environment (the S3 endpoint for S3-compatible stores)."""
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            return {"endpoint_url": endpoint}
    return {}


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem serving `url` and the path inside it."""
    return url_to_fs(url, **storage_options(get_protocol(url)))


def is_local(url: str) -> bool:
    """Whether `url` names a path on the local filesystem."""
    return get_protocol(url) in LOCAL_PROTOCOLS


def local_path(url: str) -> str:
    """The OS path of a local URL (`/x`, `file:///x`)."""
    return filesystem(url)[1]


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL with `/`."""
    return posixpath.join(url, *parts)


def dirname(url: str) -> str:
    """The URL of the folder holding `url`."""
    return posixpath.dirname(url.rstrip("/"))


def exists(url: str) -> bool:
    """Whether an object or folder exists at `url`."""
    fs, path = filesystem(url)
    return retry(lambda: fs.exists(path), what=f"exists {url}")


def is_dir(url: str) -> bool:
    """Whether `url` is a folder (or an object-store prefix with objects under it)."""
    fs, path = filesystem(url)
    return retry(lambda: fs.isdir(path), what=f"stat {url}")


def read_bytes(url: str) -> bytes:
    """The whole object at `url`."""
    fs, path = filesystem(url)
    return retry(lambda: fs.cat_file(path), what=f"read {url}")


def open_read(url: str, size: int | None = None, block_size: int = 8 << 20) -> IO[bytes]:
    """A binary stream over `url`, read ahead in `block_size` chunks on object stores.

    `size`: the object's byte size when known (a shard index has it), which saves a HEAD request.
    """
    fs, path = filesystem(url)
    if is_local(url):
        return open(path, "rb")
    options = {} if size is None else {"size": size}
    remote = retry(lambda: fs.open(path, "rb", block_size=block_size, cache_type="readahead", **options),
                   what=f"open {url}")
    # Small reads (tar headers) then stay in C instead of going through fsspec's Python read path.
    return io.BufferedReader(remote, buffer_size=1 << 20)


def write_bytes_atomic(url: str, data: bytes, durable: bool = True) -> None:
    """Write `data` so that readers see the old object or the whole new one, never a partial one.

    Local files go to a temporary file beside the target, then `os.replace`; an object store PUT is
    already atomic, so the whole object goes in one request. `durable=False` skips the local fsync
    (which costs more than writing a small file): the caller makes many files durable at once with
    `sync_local` before it relies on them.
    """
    fs, path = filesystem(url)
    if is_local(url):
        _replace_local(path, lambda tmp: tmp.write(data), durable)
    else:
        retry(lambda: fs.pipe_file(path, data), what=f"write {url}")


def write_bytes_exclusive(url: str, data: bytes) -> bool:
    """Create the object at `url` with `data` only if nothing is there yet; False if something was.

    Atomic and exclusive on local disks (a complete temporary file, hard-linked into place) and on S3
    (a conditional PUT, `If-None-Match: *`); on other stores, whatever their `pipe_file(mode="create")`
    guarantees (fsspec's default checks first, which is not atomic).
    """
    fs, path = filesystem(url)
    if not is_local(url):
        try:
            retry(lambda: fs.pipe_file(path, data, mode="create"), what=f"create {url}")
        except FileExistsError:
            return False
        return True
    fd, tmp_path = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.link(tmp_path, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp_path)
    return True


def upload_atomic(source_path: str, url: str) -> None:
    """Copy a local file to `url` atomically (multipart uploads only appear once completed)."""
    fs, path = filesystem(url)
    if is_local(url):
        def copy(tmp: IO[bytes]) -> None:
            with open(source_path, "rb") as src:
                shutil.copyfileobj(src, tmp, 8 << 20)

        _replace_local(path, copy)
    else:
        retry(lambda: fs.put_file(source_path, path), what=f"upload {url}")


def sync_local(url: str) -> None:
    """Flush files written with `durable=False` to disk, if `url` is local (object stores need not)."""
    if is_local(url):
        os.sync()


def _create_temporary(path: str) -> tuple[int, str]:
    """A new file beside `path` for writing (its folder made if missing), created with mode 0666, so
    the umask gives it the usual permissions (mkstemp's 0600 would hide outputs from other users)."""
    folder = os.path.dirname(path) or "."
    tmp_path = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(tmp_path, flags, 0o666), tmp_path
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        return os.open(tmp_path, flags, 0o666), tmp_path


def _replace_local(path: str, write: Callable[[IO[bytes]], object], durable: bool = True) -> None:
    fd, tmp_path = _create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as tmp:
            write(tmp)
            tmp.flush()
            if durable:
                os.fsync(tmp.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        os.unlink(tmp_path)
        raise


def remove(url: str, missing_ok: bool = True) -> None:
    """Delete the object at `url`."""
    fs, path = filesystem(url)
    try:
        retry(lambda: fs.rm_file(path), what=f"remove {url}")
    except FileNotFoundError:
        if not missing_ok:
            raise


def remove_folder(url: str) -> None:
    """Delete a folder or prefix and everything under it (nothing if it does not exist)."""
    fs, path = filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        retry(lambda: fs.rm(path, recursive=True), what=f"remove {url}")


def remove_empty_folder(url: str) -> None:
    """Delete a local folder if it is empty (object-store prefixes vanish with their last object)."""
    if is_local(url):
        with contextlib.suppress(OSError):
            os.rmdir(local_path(url))


def has_glob(url: str) -> bool:
    """Whether `url` holds glob wildcards."""
    return any(c in url for c in _GLOB_CHARS)


def list_files(url_or_glob: str) -> list[str]:
    """Sorted URLs of the files under a folder or prefix (recursively), matching a glob, or the file itself.

    Returned URLs keep the caller's spelling for local paths (no `file://` added) and carry the
    protocol otherwise (`s3://bucket/key`).
    """
    fs, path = filesystem(url_or_glob)
    if has_glob(url_or_glob):
        found = retry(lambda: fs.glob(path, detail=True), what=f"glob {url_or_glob}")
        paths = [p for p, info in found.items() if info.get("type") != "directory"]
    elif is_dir(url_or_glob):
        paths = retry(lambda: fs.find(path), what=f"list {url_or_glob}")
    elif retry(lambda: fs.isfile(path), what=f"stat {url_or_glob}"):
        paths = [path]
    else:
        raise FileNotFoundError(f"nothing at {url_or_glob}")
    keep_plain = is_local(url_or_glob) and "://" not in url_or_glob
    return sorted(p if keep_plain else fs.unstrip_protocol(p) for p in paths)


def url_path(url: str) -> str:
    """A URL's location without its protocol (`bucket/dir/img.jpg`, `/abs/img.jpg`): string work only,
    fast enough for millions of listed URLs."""
    protocol, sep, rest = url.partition("://")
    return rest if sep and protocol not in LOCAL_PROTOCOLS else (rest if sep else url)


def _normalized(url: str) -> tuple[str, str]:
    """(protocol, normalized path) of a URL, for comparing locations lexically."""
    protocol = get_protocol(url)
    path = url_path(url)
    if protocol in LOCAL_PROTOCOLS:
        return "file", os.path.abspath(path)
    return protocol, posixpath.normpath("/" + path)


def within(root: str) -> Callable[[str], bool]:
    """A test of whether a URL lies at or below `root` (same store; `..` and `.` resolved lexically)."""
    protocol, base = _normalized(root)
    prefix = base.rstrip("/") + "/"

    def is_under(url: str) -> bool:
        other, path = _normalized(url)
        return other == protocol and (path == base or path.startswith(prefix))

    return is_under


def relative_to(root: str) -> Callable[[str], str]:
    """`relative(url, root)` for many URLs under one root (the root is parsed once)."""
    fs, root_path = filesystem(root)
    root_path = root_path.rstrip("/") + "/"

    def below(url: str) -> str:
        path = fs._strip_protocol(url)
        if not path.startswith(root_path):
            raise ValueError(f"{url} is not under {root}")
        return path[len(root_path):]

    return below


def link_leaving(root: str) -> Callable[[str], str]:
    """For URLs listed under the folder `root`: the real path a local one leads to when symlinks take
    it out of `root`, else "". Object stores have no links."""
    if not is_local(root):
        return lambda url: ""
    base = os.path.realpath(local_path(root))
    prefix = base.rstrip("/") + "/"

    def target(url: str) -> str:
        real = os.path.realpath(url_path(url))
        return "" if real == base or real.startswith(prefix) else real

    return target


def is_folder_link(url: str) -> bool:
    """Whether `url` is a local symlink to a folder (listings show one as a file and never descend it)."""
    path = url_path(url)
    return is_local(url) and os.path.islink(path) and os.path.isdir(path)


def list_sizes(url: str) -> dict[str, int]:
    """Byte size of every file under a folder or prefix, keyed by its path relative to it."""
    fs, path = filesystem(url)
    found = retry(lambda: fs.find(path, detail=True), what=f"list {url}")
    root = path.rstrip("/") + "/"
    return {p[len(root):]: int(info["size"]) for p, info in found.items() if p.startswith(root)}


def relative(url: str, root: str) -> str:
    """The part of `url` below the folder `root` (both as returned by `list_files`)."""
    return relative_to(root)(url)


def process_running(pid: int) -> bool:
    """Whether a process of this host runs: lock and spool files name their writer's pid."""
    if pid <= 0:  # os.kill would address a process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, under another user
        return True
    return True


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **_: object) -> IO[bytes]:
    if mode == "rb":
        return open_read(url)
    fs, path = filesystem(url)
    return fs.open(path, mode)


def register_webdataset_opener() -> None:
    """Make `webdataset` open every fsspec URL (s3://, gs://, memory://, ...) through this module."""
    from webdataset.gopen import gopen_schemes

    for protocol in known_implementations:
        if protocol not in LOCAL_PROTOCOLS:
            gopen_schemes[protocol] = _gopen_fsspec
