"""The checkpoints of a run on any fsspec storage: named stateful components in, named stateful
components out, committed atomically, behind a latest pointer, pruned by keep-last.

A checkpoint is a folder ``<root>/step-%09d/`` of named blobs. Its blobs are written first and the
marker ``_COMPLETE`` last, so a folder without the marker (a writer killed midway) is never taken
for a checkpoint. ``<root>/latest`` names the newest complete folder; when it is missing or points
at something incomplete, readers fall back to scanning. A complete checkpoint whose bytes turn out
unreadable (a disk or store that lost them) is set aside as ``step-%09d.unreadable-<time>`` and the
one before it is taken.

Model-agnostic: the state blob is the mapping of each component's ``state_dict()`` (plain values as
they are), serialized by the caller's ``encode`` and read back by its ``decode``; restoring calls
``load_state_dict`` on the components the caller names (torchtitan's ``Stateful``).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from pipeline import storage

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
LATEST = "latest"
STATE_BLOB = "state.pt"
BEST = "best"  # <root>/best/: the state that scored best so far (state.pt, metrics.json)
_STEP_DIR = re.compile(r"step-(\d{9})$")
Loaded = tuple[int, str, dict[str, Any]]  # a checkpoint's step, the URL of its state and the state


@runtime_checkable
class Stateful(Protocol):
    """A component that saves and restores itself."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or an export beside it) could not be written: a full disk, a store refusing writes."""


class NoReadableCheckpoint(RuntimeError):
    """Checkpoints exist, but none can be read (all set aside)."""

    def __init__(self, root: str, count: int) -> None:
        super().__init__(f"no checkpoint under {root} can be read ({count} unreadable, set aside)")
        self.root, self.count = root, count


class RankRNG:
    """The state of one random generator per rank, as one component: ``state_dict`` gathers every
    rank's state (a collective: all ranks call it); ``load_state_dict`` takes this rank's, or, when
    the checkpoint had another number of ranks, reseeds with ``reseed()`` and says so."""

    def __init__(self, generator: torch.Generator, rank: int = 0, world_size: int = 1,
                 gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                 reseed: Callable[[], int] | None = None) -> None:
        self.generator, self.rank, self.world_size = generator, rank, world_size
        self.gather = gather or (lambda state: [state])
        self.reseed = reseed

    def state_dict(self) -> list[torch.Tensor]:
        return self.gather(self.generator.get_state())

    def load_state_dict(self, states: list[torch.Tensor]) -> None:
        if len(states) == self.world_size:
            self.generator.set_state(states[self.rank])
            return
        log.warning("checkpoint from %d ranks, running %d: patch RNG reseeded", len(states), self.world_size)
        if self.reseed is not None:
            self.generator.manual_seed(self.reseed())


def resolve_generator_url(url: str) -> str:
    """The checkpoint file a URL means: a file as it is; a run folder's newest complete checkpoint
    (``checkpoints/step-*/state.pt``), else its ``export/generator.pt``; a checkpoints folder's newest."""
    if not storage.is_dir(url):
        return url
    for root in (storage.join(url, "checkpoints"), url):
        step = Checkpointer(root).latest_step()
        if step is not None:
            return storage.join(root, step_dir_name(step), STATE_BLOB)
    export = storage.join(url, "export", "generator.pt")
    if storage.exists(export):
        return export
    raise FileNotFoundError(f"{url} is a folder with no complete checkpoint (checkpoints/step-*/) and no "
                            f"export/generator.pt: give a checkpoint file")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


class Checkpointer:
    """The checkpoints of one run, under ``root`` (e.g. ``s3://bucket/run/checkpoints``).

    ``save`` and ``load`` are called by every rank: the state is gathered on all of them (components
    may be collectives), written by the main one, and all ranks restore the same checkpoint (``agree``:
    the smallest step any rank chose, -1 for none). ``guard`` runs before each write (e.g. a lease
    check); ``unreadable``: the errors of ``decode`` that mean a checkpoint's bytes are lost.
    ``encode``/``decode`` are the caller's serialization (jobs.train passes cut.checkpoint's); a
    Checkpointer made without them lists checkpoints and reads blobs only.
    """

    def __init__(self, root: str, *, encode: Callable[[Mapping[str, Any]], bytes] | None = None,
                 decode: Callable[[bytes, str], dict[str, Any]] | None = None,
                 unreadable: tuple[type[Exception], ...] = (ValueError,), is_main: bool = True,
                 agree: Callable[[int], int] | None = None, guard: Callable[[], None] | None = None,
                 logger: logging.Logger = log) -> None:
        self.root = root.rstrip("/")
        self._encode, self._decode, self.unreadable = encode, decode, (*unreadable, FileNotFoundError)
        self.is_main, self.agree, self.guard, self.log = is_main, agree, guard, logger

    def encode(self, state: Mapping[str, Any]) -> bytes:
        if self._encode is None:
            raise TypeError("this Checkpointer lists and reads blobs only: it was made without encode")
        return self._encode(state)

    def decode(self, data: bytes, source: str) -> dict[str, Any]:
        if self._decode is None:
            raise TypeError("this Checkpointer lists and reads blobs only: it was made without decode")
        return self._decode(data, source)

    # ------------------------------------------------------------------------------ components
    def save(self, step: int, state: Mapping[str, Any], blobs: Mapping[str, bytes] | None = None,
             keep_last: int | None = None) -> str | None:
        """Commit ``state`` (each Stateful's ``state_dict()``, plain values as they are) as
        ``state.pt``, with ``blobs`` beside it, and prune to ``keep_last``. Every rank calls it; the
        main one writes and returns the folder (None elsewhere). CheckpointWriteError if a write fails."""
        snapshot = self.snapshot(state)
        if not self.is_main:
            return None
        data = self.encode(snapshot)
        try:
            folder = self.commit(step, {STATE_BLOB: data, **(blobs or {})})
        except OSError as exc:
            raise CheckpointWriteError(
                f"step {step}: could not write the checkpoint under {self.root} ({exc}); it is not "
                f"committed, a rerun resumes from the one before"
            ) from exc
        removed = self.prune(keep_last) if keep_last is not None else []
        self.log.info("step %d: saved checkpoint %s (pruned %s)", step, folder, removed or "none")
        return folder

    def snapshot(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The mapping ``save`` writes (every rank: a component's ``state_dict`` may be a collective)."""
        return {name: v.state_dict() if isinstance(v, Stateful) else v for name, v in state.items()}

    def keep_best(self, state: Mapping[str, Any], summary: Mapping[str, Any]) -> str:
        """``state`` (a ``snapshot``) as ``<root>/best/state.pt`` beside ``summary`` (its scores, as
        ``metrics.json``): the best state so far, outside the step folders. Returns the folder."""
        folder = storage.join(self.root, BEST)
        storage.write_bytes_atomic(storage.join(folder, STATE_BLOB), self.encode(state))
        storage.write_bytes_atomic(storage.join(folder, "metrics.json"), json.dumps(summary).encode())
        return folder

    def best_summary(self) -> dict[str, Any] | None:
        """What ``keep_best`` last stored beside the best state; None when there is none."""
        url = storage.join(self.root, BEST, "metrics.json")
        return json.loads(storage.read_bytes(url)) if storage.exists(url) else None

    def load(self, restore: Mapping[str, Stateful]) -> Loaded | None:
        """Restore ``restore`` (in its order) from the newest checkpoint that can be read, if any, and
        return it. An unreadable one is set aside (the main rank renames it; a warning names it) and
        the one before it taken; all ranks then agree on the oldest choice among them.
        NoReadableCheckpoint when checkpoints exist but none can be read."""
        steps = list(reversed(self.complete_steps()))
        chosen = None
        for step in steps:
            try:
                chosen = self._read(step)
                break
            except self.unreadable as exc:
                source = self.state_url(step)
                self.log.warning("step %d: checkpoint %s cannot be read (%s)", step, source, exc)
                if self.is_main:
                    moved = self.set_aside(step)
                    self.log.warning("moved it aside to %s; resuming from the one before", moved)
        chosen = self._agreed(chosen)
        if chosen is None:
            if steps:
                raise NoReadableCheckpoint(self.root, len(steps))
            return None
        for name, component in restore.items():
            component.load_state_dict(chosen[2][name])
        return chosen

    def state_url(self, step: int) -> str:
        return storage.join(self.root, step_dir_name(step), STATE_BLOB)

    def _read(self, step: int) -> Loaded:
        source = self.state_url(step)
        return step, source, self.decode(self.read(step, STATE_BLOB), source)

    def _agreed(self, chosen: Loaded | None) -> Loaded | None:
        """The same checkpoint on every rank: the oldest any rank chose."""
        if self.agree is None:
            return chosen
        mine = -1 if chosen is None else chosen[0]
        step = self.agree(mine)
        if step == mine:
            return chosen
        return None if step < 0 else self._read(step)

    # ---------------------------------------------------------------------------------- folders
    def commit(self, step: int, blobs: Mapping[str, bytes]) -> str:
        """Write ``blobs`` as the checkpoint of ``step``, commit it, point ``latest`` at it."""
        if self.guard is not None:
            self.guard()
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
