"""jobs.infer --executor ray: the plan's units through a Ray pipeline, committed by this process (the
driver) exactly as the local executor commits them.

Per unit, three stages, each the local executor's own code (jobs.translator):
  read   a CPU task: `UnitBatches` reads, decodes and batches the unit; returns its batches and, apart,
         its end message (the error rows of inputs that did not decode, and how many inputs it read);
  model  a call on one actor of a pool (one GPU each on a GPU cluster): the actor built a `Translator`
         from the InferConfig once and runs its `_launch` / `_outputs` / `_unwritable` on the batches;
  write  a CPU task: `Translator._write_one` encodes, hashes and writes each output, returning its row.
The driver keys the rows by (unit, order) (a retried task's duplicate row is dropped) and commits a
unit with `Translator._finish_unit` only when every row it read is back: the same rows, order, parts
and `_SUCCESS` as the local executor.

Retries: tasks are retried by Ray when their process dies (and on errors up to `TASK_RETRIES`); an
actor that dies is restarted and its call retried (`ACTOR_RESTARTS`). An actor that dies more often
than that is dropped and its unit read again on another actor; once no actor is left, the job ends
naming the units left uncommitted (a rerun, with either executor, finishes them).

Memory: at most `in_flight` units (2 per actor, plus 1) are between read and commit. The object store
holds, per unit in flight, its decoded network inputs (uint8 pixels at the network's size, alpha
planes, per-image metadata) until its actor call ends, and its outputs (uint8 pixels at the network's
size) until its write task ends; encoded outputs go from the write task straight to storage (with
--format shards, the unit's tar members come back to the driver, as the local executor holds them).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from jobs.infer_config import InferConfig
from jobs.signals import StopSignals
from jobs.translator import STAGES, Progress, Translator, _Unit
from pipeline import storage
from pipeline.corpus import WorkUnit
from pipeline.translation_io import Preprocess, UnitBatches

log = logging.getLogger("jobs.infer")

INSTALL = "pip install 'cut-pipeline[ray]'"
TASK_RETRIES = 3  # a read or write task whose process died, or that raised (OSError: storage trouble)
ACTOR_RESTARTS = 3  # an actor process that died is restarted this often; its calls are retried
UNIT_ATTEMPTS = 2  # a unit whose actor died for good is read again on another actor this often
# The environment the tasks need to reach storage as the driver does (credentials, S3 endpoint).
PASSED_ENV = ("AWS_", "GOOGLE_", "AZURE_")


class RayExecutorError(Exception):
    """The Ray executor cannot run: one line for the log, and jobs.infer's exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ stages
def read_unit(unit: WorkUnit, preprocess: Preprocess, batch_size: int, cwd: str) -> tuple[list[dict], dict]:
    """Ray task: the unit's batches (`UnitBatches`) and its end message, as two objects."""
    in_driver_folder(cwd)
    *batches, end = UnitBatches([unit], preprocess, batch_size)
    return batches, end


class TranslationActor:
    """Ray actor: the model, built once from the job's config, run on one unit's batches per call."""

    def __init__(self, config: InferConfig, threads: int, cwd: str) -> None:
        in_driver_folder(cwd)
        if threads:
            torch.set_num_threads(threads)
        self.translator = Translator(config)

    def ready(self) -> dict[str, Any]:
        """Where the actor runs (logged by the driver: an operator can find, or kill, its process)."""
        import ray

        t = self.translator
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": str(t.device),
                "tile": t.tile}

    def translate(self, unit: WorkUnit, batches: list[dict]) -> dict[str, Any]:
        """A unit's batches through the model, one in flight on the device while the previous one's
        outputs come back: the outputs to write (meta, pixels, model ms), the rows of inputs the device
        could not take, and the counts and CPU seconds of this call."""
        t = self.translator
        t.tiled = t.squashed = 0
        t.seconds = dict.fromkeys(STAGES, 0.0)
        items: list[tuple[dict, Any, float]] = []
        rows: list[dict] = []

        def collect(launched) -> None:
            outputs, model_ms = t._outputs(launched)
            for meta, pixels in zip(launched.meta, outputs, strict=True):
                row = t._unwritable(meta, pixels, launched.shape)
                if row is None:
                    items.append((meta, pixels.numpy(), model_ms))
                else:
                    rows.append(row)

        launched = None
        for msg in batches:
            current = t._launch(unit, msg)
            if launched is not None:
                collect(launched)
            launched = current
        if launched is not None:
            collect(launched)
        return {"items": items, "rows": rows, "tiled": t.tiled, "squashed": t.squashed,
                "seconds": t.seconds}


def write_unit(config: InferConfig, model_id: str, preset: str, unit: WorkUnit,
               translated: dict[str, Any], cwd: str) -> dict[str, Any]:
    """Ray task: encode, hash and write a unit's outputs (`Translator._write_one`); returns their rows
    (with the device's error rows), the tar members of --format shards or the encoded images of the
    table formats (the driver writes them with the unit's part), and counts and CPU seconds."""
    in_driver_folder(cwd)
    writer = Translator.for_outputs(config, model_id, preset)
    state = _Unit()
    rows = list(translated["rows"])
    rows += [writer._write_one(unit, meta, pixels, model_ms, state) for meta, pixels, model_ms
             in translated["items"]]
    if config.format == "files":
        storage.sync_local(config.out)  # on this node's disk before the driver's part says so
    seconds = {k: v + translated["seconds"][k] for k, v in writer.seconds.items()}
    return {"rows": rows, "tar_members": state.tar_members, "images": state.images,
            "dropped": dict(writer.dropped), "tiled": translated["tiled"], "squashed": translated["squashed"],
            "seconds": seconds}


def in_driver_folder(cwd: str) -> None:
    """Work in the driver's folder where this node has it (the same machine, a shared mount), so
    relative local paths (--out, --checkpoint, inputs) name what they name to the driver."""
    if os.path.isdir(cwd) and os.getcwd() != cwd:
        os.chdir(cwd)


# ------------------------------------------------------------------------------------------ driver
@dataclass
class _Flight:
    """A unit between its read and its commit, at the driver."""

    unit: WorkUnit
    attempt: int = 1
    end: dict | None = None  # the read's end message: its error rows and input count
    batches: Any = None  # the ObjectRef of its decoded batches, until the actor call holds it
    actor: int | None = None  # the pool's number of the actor translating it


class RayPipeline:
    """A connection to a Ray cluster (joined, or a local instance started here) and the actor pool
    that runs this job's model there."""

    def __init__(self, config: InferConfig, stop: StopSignals | None = None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise RayExecutorError(f"--executor ray needs Ray ({exc}): {INSTALL}", 2) from exc
        self.ray = ray
        self.cfg = config
        self.address = config.ray_address or os.environ.get("RAY_ADDRESS") or "local"
        if self.address not in ("local", "auto"):
            problem = _unreachable(self.address)
            if problem:
                raise RayExecutorError(f"the Ray cluster at {self.address} is unreachable: {problem}", 1)
        env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
        try:
            context = ray.init(address=self.address, runtime_env={"env_vars": env} if env else None,
                               logging_level=logging.WARNING, configure_logging=False)
        except (ConnectionError, RuntimeError, TimeoutError) as exc:
            raise RayExecutorError(f"could not join the Ray cluster at {self.address}: "
                                   f"{' '.join(str(exc).split())}", 1) from exc
        if stop is not None and threading.current_thread() is threading.main_thread():
            # ray.init installs its own SIGTERM handler (it ends the process at once): the job's comes
            # back, so a first signal lets the complete units commit as with the local executor.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, stop.handle)
        resources = ray.cluster_resources()
        self.cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        where = "a local Ray instance" if self.address == "local" else f"the Ray cluster at {self.address}"
        if config.device == "cuda" and not gpus:
            self.close()
            raise RayExecutorError(f"--device cuda: {where} has no GPUs ({self.cpus} CPUs); use --device "
                                   f"cpu or a cluster with GPUs", 2)
        self.gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
        actors = config.ray_actors or (gpus if self.gpu else max(1, min(2, self.cpus // 4)))
        # CPU actors share the cores but one, left to the read and write tasks.
        self.actor_cpus = 1 if self.gpu else max(1, (self.cpus - 1) // actors)
        dashboard = getattr(context, "dashboard_url", None)
        log.info("%s: %d CPUs, %d GPUs; %d translation actors (%s)%s", where, self.cpus, gpus, actors,
                 "1 GPU each" if self.gpu else f"{self.actor_cpus} CPUs each",
                 f"; dashboard http://{dashboard}" if dashboard else "")
        self.actor_count = actors
        self.in_flight = 2 * actors + 1
        self.lost: str | None = None  # why units were left uncommitted, when the actors kept dying
        self.dropped: list[int] = []  # units whose actors died on every attempt

    def close(self) -> None:
        """Leave the cluster (a local instance started here stops)."""
        self.ray.shutdown()

    def run(self, translator: Translator, units: list[WorkUnit], stop: StopSignals) -> None:
        """Run `units` through the pipeline, committing each at the driver; sets the translator's
        stats, failed and unfinished units as its own `run` does."""
        ray, cfg = self.ray, self.cfg
        if not units:
            return
        retried = {"max_retries": TASK_RETRIES, "retry_exceptions": [OSError]}  # storage trouble, again
        read = ray.remote(num_returns=2, **retried)(read_unit)
        write = ray.remote(**retried)(write_unit)
        pool = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=ACTOR_RESTARTS)(TranslationActor)
        pool = pool.options(num_cpus=self.actor_cpus, num_gpus=int(self.gpu))
        cwd = os.getcwd()
        actors = {i: pool.remote(cfg, self.actor_cpus, cwd) for i in range(self.actor_count)}
        busy = dict.fromkeys(actors, 0)
        pre = translator.preprocess()
        queue = deque(_Flight(u) for u in units)
        flights: dict[int, _Flight] = {}
        waiting: dict[Any, tuple[str, Any]] = {a.ready.remote(): ("ready", i) for i, a in actors.items()}
        progress = Progress(cfg, units)
        committed = 0
        try:
            while (queue or flights) and not stop.is_set():
                while queue and len(flights) < self.in_flight and actors:
                    flight = queue.popleft()
                    flight.batches, end = read.remote(flight.unit, pre, cfg.batch_size, cwd)
                    flights[flight.unit.index] = flight
                    waiting[end] = ("read", flight)
                if not actors:
                    break
                ready, _ = ray.wait(list(waiting), num_returns=1, timeout=1.0)
                for ref in ready:
                    stage, what = waiting.pop(ref)
                    if stage == "write" and what.actor in busy:
                        busy[what.actor] -= 1
                    try:
                        value = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        if stage == "ready" or isinstance(exc, ray.exceptions.RayActorError):
                            self._actor_died(stage, what, exc, actors, busy, flights, queue)
                        else:
                            self._unit_failed(translator, what, exc, flights)
                        continue
                    if stage == "ready":
                        translator.tile = value["tile"]
                        log.info("translation actor %d: pid %d on %s (%s)", what, value["pid"], value["node"],
                                 value["device"])
                    elif stage == "read":
                        what.end = value
                        if not busy:  # no actor left: the unit stays uncommitted
                            continue
                        what.actor = min(busy, key=busy.get)  # the actor with the fewest units queued
                        busy[what.actor] += 1
                        translated = actors[what.actor].translate.remote(what.unit, what.batches)
                        what.batches = None  # the call holds the decoded unit now
                        waiting[write.remote(cfg, translator.model_id, translator.preset, what.unit,
                                             translated, cwd)] = ("write", what)
                    else:
                        count = self._commit(translator, what, value)
                        del flights[what.unit.index]
                        committed += 1
                        progress.update(count, committed)
                progress.update(0, committed)  # the 30 s log line, between commits too
            if stop.is_set():  # commit what is complete, as the local executor does on a signal
                for ref, (stage, what) in list(waiting.items()):
                    if stage == "write" and ray.wait([ref], timeout=0)[0]:
                        try:
                            count = self._commit(translator, what, ray.get(ref))
                        except ray.exceptions.RayError:
                            continue
                        del flights[what.unit.index]
                        committed += 1
                        progress.update(count, committed)
        finally:
            progress.close()
            for actor in actors.values():
                ray.kill(actor)
        left = {f.unit.index for f in flights.values()} | {f.unit.index for f in queue} | set(self.dropped)
        translator.unfinished = sorted(set(left) - set(translator.failed))
        translator.elapsed = progress.elapsed()
        if translator.unfinished and self.lost and not stop.is_set():
            self.lost = (f"the translation actors died more often than Ray restarts them ({ACTOR_RESTARTS} "
                         f"times each; last: {self.lost}): units {units_text(translator.unfinished)} left "
                         f"uncommitted; rerun to finish them")
        translator.report()

    def _commit(self, translator: Translator, flight: _Flight, written: dict[str, Any]) -> int:
        """Commit a unit once every input it read has its row; returns its row count."""
        end = flight.end
        rows = {row["order"]: row for row in [*written["rows"], *end["errors"]]}  # (unit, order): once
        translator._add_time(**written["seconds"])
        translator.dropped.update(written["dropped"])
        translator.tiled += written["tiled"]
        translator.squashed += written["squashed"]
        if len(rows) != end["count"]:
            translator.failed.append(flight.unit.index)
            log.error("unit %d (%s): %d of its %d rows came back; it stays uncommitted", flight.unit.index,
                      flight.unit.source, len(rows), end["count"])
            return 0
        state = _Unit(rows=list(rows.values()), tar_members=written["tar_members"], images=written["images"])
        translator._finish_unit(flight.unit, state, [])
        return len(rows)

    def _unit_failed(self, translator: Translator, flight: _Flight, exc: Exception,
                     flights: dict[int, _Flight]) -> None:
        flights.pop(flight.unit.index, None)
        translator.failed.append(flight.unit.index)
        log.error("unit %d (%s) failed and stays uncommitted: %s", flight.unit.index, flight.unit.source,
                  _one_line(exc))

    def _actor_died(self, stage: str, what: Any, exc: Exception, actors: dict, busy: dict,
                    flights: dict[int, _Flight], queue: deque) -> None:
        """An actor dead for good (past its restarts): out of the pool; its unit goes back to the
        queue (read again) while it has attempts left."""
        index = what if stage == "ready" else what.actor
        if index in actors:
            log.warning("translation actor %d died for good: %s", index, _one_line(exc))
            del actors[index]
            busy.pop(index, None)
        self.lost = _one_line(exc)
        if isinstance(what, _Flight):
            flights.pop(what.unit.index, None)
            if what.attempt < UNIT_ATTEMPTS:
                queue.appendleft(_Flight(what.unit, what.attempt + 1))
            else:
                self.dropped.append(what.unit.index)


def _unreachable(address: str) -> str | None:
    """Why nothing answers at a host:port address (``ray://`` too), or None: Ray itself waits minutes
    before it gives up on a cluster that is not there."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None  # a form Ray resolves itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _one_line(exc: BaseException) -> str:
    """An error of Ray's, short: a task's own error, or an actor's death in its first sentence (Ray's
    texts run to paragraphs)."""
    cause = getattr(exc, "cause", None)  # RayTaskError: the task's exception
    if isinstance(cause, BaseException):
        exc = cause
    text = " ".join(str(exc).split())
    if isinstance(exc, _actor_error_types()):
        text = text.split(". ")[0]
    return f"{type(exc).__name__}: {text[:300]}"


def _actor_error_types() -> tuple[type, ...]:
    import ray

    return (ray.exceptions.RayActorError,)


def units_text(units: list[int], shown: int = 20) -> str:
    """Unit numbers for a log line: all of a few, the first `shown` of many."""
    if len(units) <= shown:
        return str(units)
    return f"{str(units[:shown])[:-1]}, ... ({len(units)} in all)]"

