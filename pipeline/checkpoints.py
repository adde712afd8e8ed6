"""Checkpoint folders on any fsspec storage: atomic commit, a latest pointer, keep-last pruning.

A checkpoint is a folder ``<root>/step-%09d/`` of named blobs. Its blobs are written first and the
marker ``_COMPLETE`` last, so a folder without the marker (a writer killed midway) is never taken
for a checkpoint. ``<root>/latest`` names the newest complete folder; when it is missing or points
at something incomplete, readers fall back to scanning. A complete checkpoint whose bytes turn out
unreadable (a disk or store that lost them) is set aside as ``step-%09d.unreadable-<time>``.
Model-agnostic: blobs are bytes.
"""

from __future__ import annotations

import logging
import re
import time

from pipeline import storage

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d{9})$")


def resolve_generator_url(url: str) -> str:
    """The checkpoint file a URL means: a file as it is; a run folder's newest complete checkpoint
    (``checkpoints/step-*/state.pt``), else its ``export/generator.pt``; a checkpoints folder's newest."""
    if not storage.is_dir(url):
        return url
    for root in (storage.join(url, "checkpoints"), url):
        step = CheckpointStore(root).latest_step()
        if step is not None:
            return storage.join(root, step_dir_name(step), "state.pt")
    export = storage.join(url, "export", "generator.pt")
    if storage.exists(export):
        return export
    raise FileNotFoundError(f"{url} is a folder with no complete checkpoint (checkpoints/step-*/) and no "
                            f"export/generator.pt: give a checkpoint file")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


class CheckpointStore:
    """The checkpoints of one run, under ``root`` (e.g. ``s3://bucket/run/checkpoints``)."""

    def __init__(self, root: str) -> None:
        self.root = root.rstrip("/")

    def save(self, step: int, blobs: dict[str, bytes]) -> str:
        """Write ``blobs`` as the checkpoint of ``step``, commit it, point ``latest`` at it."""
        folder = storage.join(self.root, step_dir_name(step))
        for name, data in blobs.items():
            storage.write_bytes_atomic(storage.join(folder, name), data)
        storage.write_bytes_atomic(storage.join(folder, COMPLETE), str(step).encode())
        storage.write_bytes_atomic(storage.join(self.root, LATEST), step_dir_name(step).encode())
        return folder

    def _step_dirs(self) -> dict[int, bool]:
        """Every step folder, mapped to whether it is complete."""
        if not storage.exists(self.root):
            return {}
        found: dict[int, bool] = {}
        for url in storage.list_files(self.root):
            parts = url.rstrip("/").split("/")
            if len(parts) > 1 and (m := _STEP_DIR.match(parts[-2])):
                step = int(m.group(1))
                found[step] = found.get(step, False) or parts[-1] == COMPLETE
        return found

    def complete_steps(self) -> list[int]:
        """Steps of all committed checkpoints, ascending."""
        return sorted(step for step, done in self._step_dirs().items() if done)

    def latest_step(self) -> int | None:
        """The newest committed step: the pointer when it is sound, else a scan; None when there is none."""
        pointer = storage.join(self.root, LATEST)
        if storage.exists(pointer):
            name = storage.read_bytes(pointer).decode().strip()
            m = _STEP_DIR.match(name)
            if m and storage.exists(storage.join(self.root, name, COMPLETE)):
                return int(m.group(1))
            log.warning("checkpoint pointer %s names %r, which is not complete; scanning", pointer, name)
        steps = self.complete_steps()
        return steps[-1] if steps else None

    def set_aside(self, step: int) -> str:
        """Move an unreadable checkpoint out of the way (renamed, kept for inspection): readers then
        take the newest one before it. Returns its new URL."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        source = storage.join(self.root, step_dir_name(step))
        target = storage.join(self.root, f"{step_dir_name(step)}.unreadable-{stamp}")
        fs, path = storage.filesystem(source)
        target_path = storage.filesystem(target)[1]
        storage.retry(lambda: fs.mv(path, target_path, recursive=True), what=f"move {source}")
        steps = self.complete_steps()
        if steps:
            storage.write_bytes_atomic(storage.join(self.root, LATEST), step_dir_name(steps[-1]).encode())
        else:
            storage.remove(storage.join(self.root, LATEST))
        return target

    def read(self, step: int, name: str) -> bytes:
        return storage.read_bytes(storage.join(self.root, step_dir_name(step), name))

    def prune(self, keep_last: int) -> list[int]:
        """Delete all but the newest ``keep_last`` complete checkpoints, and partial ones older than those."""
        dirs = self._step_dirs()
        kept = sorted(step for step, done in dirs.items() if done)[-keep_last:]
        if not kept:
            return []
        removed = sorted(step for step in dirs if step < kept[0])
        for step in removed:
            fs, path = storage.filesystem(storage.join(self.root, step_dir_name(step)))
            storage.retry(lambda fs=fs, path=path: fs.rm(path, recursive=True), what=f"remove {path}")
        return removed
