"""Delta Lake tables through the `deltalake` package: how to reach one (storage options from the
environment, as pipeline.storage reaches the same URLs), which data files a snapshot holds, and one
append per work unit that a retry cannot repeat (an application transaction in the commit).

`deltalake` is an optional extra (cut-pipeline[lake]): it is imported when a function here runs.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from pipeline import storage

# A table's files as snapshot_files gives them: (file URL, size in bytes, partition values).
DataFile = tuple[str, int, dict[str, Any]]


class DeltaVersionError(FileNotFoundError):
    """A table version that cannot be read: never written, its log cleaned up, or its data files
    vacuumed. A FileNotFoundError, so a job refuses it as it refuses a missing input (exit 2)."""


def _deltalake() -> Any:
    try:
        import deltalake
    except ImportError as exc:  # an optional extra
        raise ImportError("Delta tables need the deltalake package: pip install "
                          "'cut-pipeline[lake]'") from exc
    return deltalake


def table_uri(url: str) -> str:
    """The location deltalake takes for ``url``: an OS path for a local URL (``file://`` removed),
    else the URL itself."""
    return storage.local_path(url) if storage.is_local(url) else url


def storage_options(url: str) -> dict[str, str]:
    """What deltalake needs to reach the table at ``url``, from the same environment pipeline.storage
    reads: nothing for a local path; for ``s3://`` the endpoint (AWS_ENDPOINT_URL_S3, else
    AWS_ENDPOINT_URL), credentials and region, and AWS_ALLOW_HTTP for a plain-http endpoint (MinIO or
    a test server on loopback; deltalake refuses http otherwise). Other stores: deltalake reads their
    standard variables itself.

    Concurrent writers on S3 need nothing more: deltalake 1.x writes each commit file with a
    conditional PUT (If-None-Match: *), so two workers racing for the same version get one success
    and one conflict that deltalake retries (an append) or reports; its DynamoDB lock is gone in 1.x
    and AWS_S3_ALLOW_UNSAFE_RENAME (which lets racing commits overwrite each other) must stay unset.
    The moto server of tests/conftest.py honours If-None-Match (PreconditionFailed), and two
    processes appending at once there keep every commit (tests/test_infer_table_output.py).
    """
    if storage.is_local(url) or url.split("://", 1)[0] not in ("s3", "s3a"):
        return {}
    env = os.environ
    options = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        options["AWS_REGION"] = region
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        if env.get(name):
            options[name] = env[name]
    return options


def open_table(url: str, version: int | None = None) -> Any:
    """The ``deltalake.DeltaTable`` at ``url`` (its current snapshot, or ``version``).
    FileNotFoundError where no Delta table is there; DeltaVersionError for a version it cannot load."""
    deltalake = _deltalake()
    from deltalake.exceptions import DeltaError, TableNotFoundError

    uri, options = table_uri(url), storage_options(url)
    try:
        table = deltalake.DeltaTable(uri, storage_options=options)
    except TableNotFoundError as exc:
        raise FileNotFoundError(f"no Delta table at {url} (no _delta_log/ there)") from exc
    if version is None or version == table.version():
        return table
    latest = table.version()
    if not 0 <= version <= latest:
        raise DeltaVersionError(f"{url} has no version {version}: its versions are 0 to {latest}")
    try:
        table.load_as_version(version)
    except DeltaError as exc:
        raise DeltaVersionError(f"version {version} of {url} cannot be read from its log (cleaned up? the "
                                f"current version is {latest}): {exc}") from exc
    return table


def snapshot_files(url: str, version: int | None = None) -> tuple[int, list[DataFile]]:
    """The version read and the data files of the Delta table at ``url``, from its log (no data file is
    opened): each file's URL, byte size and partition values (a dict, empty for an unpartitioned
    table). ``version`` None reads the current snapshot.

    A named version whose files were vacuumed is a DeltaVersionError (its log outlives its files); this
    costs one listing of the table's folder. The current snapshot's files are not checked here: a
    reader that finds one missing reports it per file."""
    table = open_table(url, version)
    read = table.version()
    actions = pa.table(table.get_add_actions(flatten=False))
    paths = actions.column("path").to_pylist()
    sizes = actions.column("size_bytes").to_pylist()
    partitions = (actions.column("partition").to_pylist() if "partition" in actions.column_names
                  else [None] * len(paths))
    files = [(_file_url(url, path), int(size), dict(values or {}))
             for path, size, values in zip(paths, sizes, partitions, strict=True)]
    if version is not None:
        _check_not_vacuumed(url, read, paths)
    return read, files


def _file_url(url: str, path: str) -> str:
    """A data file's URL: the log holds a URI-encoded path relative to the table (or an absolute URI)."""
    if "://" in path:
        return path
    return posixpath.join(url.rstrip("/"), unquote(path))


def _check_not_vacuumed(url: str, version: int, paths: list[str]) -> None:
    relative = [unquote(p) for p in paths if "://" not in p]
    if not relative:
        return
    present = storage.list_sizes(url)
    missing = [p for p in relative if p not in present]
    if missing:
        raise DeltaVersionError(f"version {version} of {url} was vacuumed: {len(missing)} of its "
                                f"{len(relative)} data files are gone (e.g. {missing[0]}); read a newer "
                                f"version or the current one")


def append_once(url: str, table: pa.Table, app_id: str, attempts: int = 5) -> bool:
    """Append ``table`` to the Delta table at ``url`` (created by the first append) in one commit that
    carries the application transaction ``app_id``, unless a commit with it is already in the log.
    Returns whether this call appended.

    The check and the commit are not one step, but Delta's conflict check closes the gap: a commit
    whose transaction id another commit wrote since its snapshot fails (CommitFailedError), and the
    next attempt finds that commit and appends nothing. Other concurrent appends are retried by
    deltalake itself; a failed creation race (two first appends) by the loop here."""
    return storage.retry(lambda: _append_once(url, table, app_id, attempts), what=f"append to {url}")


def _append_once(url: str, table: pa.Table, app_id: str, attempts: int) -> bool:
    deltalake = _deltalake()
    from deltalake.exceptions import CommitFailedError

    for attempt in range(1, attempts + 1):
        try:
            current = open_table(url)
        except FileNotFoundError:
            current = None
        if current is not None and current.transaction_version(app_id) is not None:
            return False
        commit = deltalake.CommitProperties(
            app_transactions=[deltalake.Transaction(app_id, 0)], max_commit_retries=100)
        try:
            if current is None:
                deltalake.write_deltalake(table_uri(url), table, mode="append",
                                          storage_options=storage_options(url), commit_properties=commit)
            else:
                deltalake.write_deltalake(current, table, mode="append", commit_properties=commit)
            return True
        except CommitFailedError:
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
