"""jobs.infer --executor ray: the plan's units through a Ray Data pipeline, committed by this process
(the driver) exactly as the local executor commits them.

The pipeline, records of whole model batches, closed at `RECORD_IMAGES` images or `RECORD_BYTES` of
pixels (each stage the local executor's own code, jobs.translator):
  read    CPU tasks (`flat_map`, one unit per input block): `UnitBatches` reads, decodes and batches
          the unit into records; the unit's last record ends with its end message (the error rows of
          inputs that did not decode, and how many inputs it read);
  model   an actor pool (`map` with `TranslationActor`; one GPU per actor on a GPU cluster, an
          autoscaling pool of 1 to n actors, or --ray-actors of them): each actor built a `Translator`
          from the InferConfig once and runs its `_launch` / `_outputs` / `_unwritable` on each batch
          of a record, on the actor's main thread;
  write   CPU tasks (`map`): `Translator._write_one` encodes, hashes and writes each output, giving
          back its row (and, for --format shards and the table formats, the tar members or encoded
          images the driver writes with the unit's part).
Records are plain bytes (a pickled list of dicts of numpy arrays and Python values: no torch tensors in
blocks), each a block of its own, so a record moves to the next stage as soon as it is done: the model
starts on a unit's first record while the rest is read, and writes follow the model record by record.
A record of several batches (8 images at the CPU's batch size 1) spares Ray Data's per-block work (the
driver's scheduling, a task and an object per stage) without holding the pipeline back.
The driver streams the results (`iter_rows`), keeps a batch's rows once (keyed by (unit, orders): a
retried task's or restarted actor's duplicate is dropped) and commits a unit with
`Translator._finish_unit` once every input its read counted has its row: the same rows, order, parts
and `_SUCCESS` as the local executor. A unit short of rows stays uncommitted (exit 1; a rerun, with
either executor, finishes it).

Retries: read and write tasks are retried by Ray when their process dies and on OSError (storage
trouble), `TASK_RETRIES` times; an actor that dies is restarted and its call retried
(`ACTOR_RESTARTS`). Past that the pipeline stops and the job ends naming the units left uncommitted.

Memory: at most `in_flight` units (2 per actor, plus 1) are being read at once; Ray Data's backpressure
stops new reads while the pipeline's blocks hold more than `OBJECT_STORE_LIMIT` of the object store
(spread over its operators), so the units in flight are those few reads plus what that budget holds.
The object store holds, per unit in flight: its decoded network inputs (uint8 pixels at the network's
size, alpha planes, per-image metadata; a block per record) until the actor has taken each record; then
its outputs (uint8 pixels at the network's size) until the write task has taken them; then its rows
(and, with --format shards or a table format, its encoded outputs) until the driver has them. Files
outputs go from the write task straight to storage.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from jobs.infer_config import InferConfig
from jobs.runtime import reuse_freed_memory
from jobs.signals import StopSignals
from jobs.translator import STAGES, Progress, Translator, _Unit
from pipeline import storage
from pipeline.corpus import WorkUnit
from pipeline.translation_io import Preprocess, UnitBatches

log = logging.getLogger("jobs.infer")

INSTALL = "pip install 'cut-pipeline[ray]'"
RAY_VERSIONS = ((2, 53), (2, 64))  # the Rays the executor runs on (pyproject.toml's `ray` extra says why)
TASK_RETRIES = 3  # a read or write task whose process died, or that raised (OSError: storage trouble)
ACTOR_RESTARTS = 3  # an actor process that died is restarted this often; its calls are retried
# A record (a block) carries whole batches until it holds this many images or bytes of pixels, so
# that large images still move on a batch at a time (the actor holds a record's inputs and outputs).
RECORD_IMAGES = 8
RECORD_BYTES = 64 << 20
OBJECT_STORE_LIMIT = 2 << 30  # bytes of the object store the pipeline's blocks may hold (backpressure)
# The environment the tasks need to reach storage as the driver does (credentials, S3 endpoint).
PASSED_ENV = ("AWS_", "GOOGLE_", "AZURE_")


class RayExecutorError(Exception):
    """The Ray executor cannot run: one line for the log, and jobs.infer's exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------ stages
def _record(unit: int, payload: Any) -> dict[str, Any]:
    """A pipeline record: the unit's number and its payload, pickled (one bytes column)."""
    return {"unit": unit, "payload": pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)}


@dataclass(frozen=True)
class _UnitRef:
    """What the stages after the read use of a WorkUnit (its outputs' URLs), without its items."""

    index: int
    input_index: int


def read_unit(item: dict[str, Any], preprocess: Preprocess, batch_size: int, cwd: str) -> Iterator[dict]:
    """Read stage: the unit's batches (`UnitBatches`), their pixels and alpha planes as numpy arrays,
    in records of whole batches closed at `RECORD_IMAGES` images or `RECORD_BYTES` of pixels, the
    unit's end message in its last. Each record goes on as soon as it is read (a block of its own), so
    the model starts on a unit's first record while the rest is read."""
    in_driver_folder(cwd)
    unit: WorkUnit = pickle.loads(item["payload"])
    ref = _UnitRef(unit.index, unit.input_index)
    group: list[dict] = []
    images = pixels = 0
    for msg in UnitBatches([unit], preprocess, batch_size):
        if "end" not in msg:
            msg["x"] = msg["x"].numpy()
            for meta in msg["meta"]:
                meta["alpha"] = None if meta["alpha"] is None else meta["alpha"].numpy()
            images += len(msg["meta"])
            pixels += msg["x"].nbytes
        msg["ref"] = ref
        group.append(msg)
        if images >= RECORD_IMAGES or pixels >= RECORD_BYTES or "end" in msg:
            yield _record(unit.index, group)
            group, images, pixels = [], 0, 0


class TranslationActor:
    """Model stage, an actor of the pool: the model, built once from the job's config, run on one
    batch per call (end records pass through)."""

    def __init__(self, config: InferConfig, threads: int, cwd: str) -> None:
        import ray

        in_driver_folder(cwd)
        reuse_freed_memory()  # as jobs.infer's own process: no page faults for each batch's activations
        if threads:
            torch.set_num_threads(threads)
        self.translator = t = Translator(config)
        # Where the actor runs, in each of its records: the driver logs it (an operator can find, or
        # kill, its process) and learns the tile size.
        self.where = {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": str(t.device),
                      "tile": t.tile}

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        batches = pickle.loads(record["payload"])
        return _record(record["unit"], [msg if "end" in msg else self.translate(msg) for msg in batches])

    def translate(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One batch: its outputs as numpy arrays, the rows of those the device could not take."""
        t = self.translator
        t.tiled = t.squashed = 0
        t.seconds = dict.fromkeys(STAGES, 0.0)
        msg["x"] = torch.from_numpy(msg["x"])
        launched = t._launch(msg["ref"], msg)
        outputs, model_ms = t._outputs(launched)
        items, rows = [], []
        for meta, pixels in zip(launched.meta, outputs, strict=True):
            row = t._unwritable(meta, pixels, launched.shape)
            if row is None:
                items.append((meta, pixels.numpy(), model_ms))
            else:
                rows.append(row)
        return {"ref": msg["ref"], "items": items, "rows": rows, "tiled": t.tiled, "squashed": t.squashed,
                "seconds": t.seconds, "actor": self.where}


def write_record(record: dict[str, Any], config: InferConfig, model_id: str, preset: str, cwd: str,
                 driver_node: str) -> dict[str, Any]:
    """Write stage: encode, hash and write a record's outputs (`Translator._write_one`); for each
    batch, its rows (with the device's error rows), the tar members of --format shards or the encoded
    images of the table formats (the driver writes them with the unit's part), and counts and CPU
    seconds. End messages pass through."""
    in_driver_folder(cwd)
    writer = Translator.for_outputs(config, model_id, preset)
    written = [msg if "end" in msg else _write_batch(writer, msg) for msg in pickle.loads(record["payload"])]
    if config.format == "files" and node_id() != driver_node:
        # On another node's disk (a shared mount) before the driver's part names them; on the driver's
        # node its commit flushes a unit's files once, as the local executor does.
        storage.sync_local(config.out)
    return _record(record["unit"], written)


def _write_batch(writer: Translator, translated: dict[str, Any]) -> dict[str, Any]:
    """One translated batch through `Translator._write_one`: its rows, tar members or images, counts."""
    state = _Unit()
    unit = translated["ref"]
    rows = list(translated["rows"])
    # Counts per batch, not per record: the driver keeps each batch once (a retried record's are dropped).
    writer.seconds = dict.fromkeys(STAGES, 0.0)
    writer.dropped.clear()
    for meta, pixels, model_ms in translated["items"]:
        if meta["alpha"] is not None:
            meta["alpha"] = torch.from_numpy(meta["alpha"])
        rows.append(writer._write_one(unit, meta, pixels, model_ms, state))
    seconds = {k: v + translated["seconds"][k] for k, v in writer.seconds.items()}
    return {"rows": rows, "tar_members": state.tar_members, "images": state.images,
            "dropped": dict(writer.dropped), "tiled": translated["tiled"], "squashed": translated["squashed"],
            "seconds": seconds, "actor": translated["actor"]}


def node_id() -> str:
    """The Ray node this process runs on."""
    import ray

    return ray.get_runtime_context().get_node_id()


def in_driver_folder(cwd: str) -> None:
    """Work in the driver's folder where this node has it (the same machine, a shared mount), so
    relative local paths (--out, --checkpoint, inputs) name what they name to the driver."""
    if os.path.isdir(cwd) and os.getcwd() != cwd:
        os.chdir(cwd)


# ------------------------------------------------------------------------------------------ driver
@dataclass
class _Flight:
    """A unit between its read and its commit, at the driver: its rows so far, keyed by order."""

    unit: WorkUnit
    end: dict | None = None  # the read's end record: its error rows and input count
    rows: dict[int, dict] = field(default_factory=dict)
    tar_members: list[tuple[str, str, bytes]] = field(default_factory=list)
    images: dict[int, bytes] = field(default_factory=dict)

    def complete(self) -> bool:
        return self.end is not None and len(self.rows) == self.end["count"]


class RayPipeline:
    """A connection to a Ray cluster (joined, or a local instance started here) and the Ray Data
    pipeline that runs this job's units there."""

    def __init__(self, config: InferConfig, stop: StopSignals | None = None) -> None:
        try:
            import ray
            import ray.data
        except ImportError as exc:
            raise RayExecutorError(f"--executor ray needs Ray ({exc}): {INSTALL}", 2) from exc
        if not RAY_VERSIONS[0] <= _version(ray.__version__) < RAY_VERSIONS[1]:
            raise RayExecutorError(f"--executor ray needs Ray {_version_text(RAY_VERSIONS[0])} to below "
                                   f"{_version_text(RAY_VERSIONS[1])}, found {ray.__version__}: {INSTALL}", 2)
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
        log.info("%s: %d CPUs, %d GPUs; %s translation actors (%s)%s", where, self.cpus, gpus,
                 f"1 to {actors}" if actors > 1 and not config.ray_actors else actors,
                 "1 GPU each" if self.gpu else f"{self.actor_cpus} CPUs each",
                 f"; dashboard http://{dashboard}" if dashboard else "")
        self.actor_count = actors
        self.in_flight = 2 * actors + 1
        self.lost: str | None = None  # why units stay uncommitted: actors kept dying, retries spent
        # Ray Data's progress bars and INFO lines would interleave with the job's own log.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "bars disabled"
        # Its tracebacks of an error that ends the pipeline: `run` says it in one line.
        for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        data = ray.data.DataContext.get_current()
        data.enable_progress_bars = False
        data.print_on_execution_start = False
        # Every record (a model batch) is a block of its own, so each stage passes it on at once: with
        # Ray Data's 128 MiB blocks a unit's batches would reach the model only after its whole read,
        # and the writes only after its whole translation.
        data.target_max_block_size = 1
        data.execution_options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=OBJECT_STORE_LIMIT)

    def close(self) -> None:
        """Leave the cluster (a local instance started here stops)."""
        self.ray.shutdown()

    def dataset(self, translator: Translator, units: list[WorkUnit]):
        """The pipeline over `units`: read tasks, the translation actor pool, write tasks."""
        ray, cfg, cwd = self.ray, self.cfg, os.getcwd()
        retried = {"max_retries": TASK_RETRIES, "retry_exceptions": [OSError]}  # storage trouble, again
        sizes = {"size": cfg.ray_actors} if cfg.ray_actors else {"min_size": 1, "max_size": self.actor_count}
        # Each call on the actor's main thread, not on a thread of Ray Data's: glibc serves another
        # thread's allocations from an arena of its own, which `reuse_freed_memory` does not tune and
        # which hands a forward's activations back to the kernel after each call (measured: 24,600
        # page faults per 256x256 CPU forward against 8,200 on the main thread; the forward 0.55 ->
        # 0.8 s on 2 cores).
        pool = ray.data.ActorPoolStrategy(**sizes, enable_true_multi_threading=True)
        items = [_record(u.index, u) for u in units]
        with warnings.catch_warnings():
            # Ray 2.60 names no parameter for an operator's retries but its (deprecated) remote args.
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            return (
                ray.data.from_items(items, override_num_blocks=len(units))
                .flat_map(read_unit, fn_args=(translator.preprocess(), cfg.batch_size, cwd),
                          compute=ray.data.TaskPoolStrategy(size=min(self.in_flight, len(units))), **retried)
                .map(TranslationActor, fn_constructor_args=(cfg, self.actor_cpus, cwd), compute=pool,
                     num_cpus=self.actor_cpus, num_gpus=int(self.gpu), max_restarts=ACTOR_RESTARTS,
                     max_task_retries=ACTOR_RESTARTS)
                .map(write_record, fn_args=(cfg, translator.model_id, translator.preset, cwd, node_id()),
                     **retried)
            )

    def run(self, translator: Translator, units: list[WorkUnit], stop: StopSignals) -> None:
        """Run `units` through the pipeline, committing each at the driver; sets the translator's
        stats, failed and unfinished units as its own `run` does."""
        if not units:
            return
        flights = {u.index: _Flight(u) for u in units}
        seen: set[tuple[int, tuple[int, ...]]] = set()  # (unit, orders) of the batches kept
        actors: dict[int, int] = {}  # pid -> the number the log gives the actor
        progress = Progress(self.cfg, units)
        committed = 0
        try:
            for record in self.dataset(translator, units).iter_rows():
                flight = flights.get(record["unit"])
                if flight is None:  # committed: a retry's late duplicate
                    continue
                for msg in pickle.loads(record["payload"]):
                    self._take(translator, flight, msg, seen, actors)
                if flight.complete():
                    del flights[flight.unit.index]
                    state = _Unit(rows=list(flight.rows.values()), tar_members=flight.tar_members,
                                  images=flight.images)
                    translator._finish_unit(flight.unit, state, [])
                    committed += 1
                    progress.update(len(flight.rows), committed)
                progress.update(0, committed)  # the 30 s log line, between commits too
                if stop.is_set():  # the units complete so far are committed, as the local executor's
                    break
        except Exception as exc:  # Ray's errors once its retries are spent: the units left say so
            died = _actor_died(exc)
            self.lost = (f"the translation actors died more often than Ray restarts them ({ACTOR_RESTARTS} "
                         f"times each; last: {_one_line(exc)})" if died else
                         f"the Ray Data pipeline failed after Ray's retries ({_one_line(exc)})")
        finally:
            progress.close()
        if not stop.is_set() and not self.lost:
            for flight in flights.values():
                if flight.end is not None:
                    translator.failed.append(flight.unit.index)
                    log.error("unit %d (%s): %d of its %d rows came back; it stays uncommitted",
                              flight.unit.index, flight.unit.source, len(flight.rows), flight.end["count"])
        translator.unfinished = sorted(set(flights) - set(translator.failed))
        translator.elapsed = progress.elapsed()
        if translator.unfinished and self.lost:
            self.lost += f": units {units_text(translator.unfinished)} left uncommitted; rerun to finish them"
        translator.report()

    @classmethod
    def _take(cls, translator: Translator, flight: _Flight, msg: dict[str, Any],
              seen: set[tuple[int, tuple[int, ...]]], actors: dict[int, int]) -> None:
        """A message of a unit's record at the driver: its end (error rows, input count) or a written
        batch, kept once (a retried task's or restarted actor's duplicate batch is dropped)."""
        if "end" in msg:
            flight.end = msg
            batch = msg["errors"]
        else:
            batch = msg["rows"]
            key = (flight.unit.index, tuple(sorted(r["order"] for r in batch)))
            if key in seen:
                return
            seen.add(key)
            cls._add(translator, flight, msg, actors)
        flight.rows.update((row["order"], row) for row in batch)

    @staticmethod
    def _add(translator: Translator, flight: _Flight, written: dict[str, Any], actors: dict[int, int]
             ) -> None:
        """A written batch's outputs and counts into its unit and the job's totals."""
        actor = written["actor"]
        if actor["pid"] not in actors:
            actors[actor["pid"]] = len(actors)
            translator.tile = actor["tile"]
            log.info("translation actor %d: pid %d on %s (%s)", actors[actor["pid"]], actor["pid"],
                     actor["node"], actor["device"])
        flight.tar_members += written["tar_members"]
        flight.images.update(written["images"])
        translator._add_time(**written["seconds"])
        translator.dropped.update(written["dropped"])
        translator.tiled += written["tiled"]
        translator.squashed += written["squashed"]


def _version(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.60.0" or "2.61.0rc1"."""
    major, minor = [*text.split("."), "0"][:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _version_text(version: tuple[int, int]) -> str:
    return ".".join(map(str, version))


def _actor_died(exc: BaseException) -> bool:
    """Whether Ray's error is (or was caused by) an actor that died past its restarts."""
    import ray

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ray.exceptions.RayActorError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


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

