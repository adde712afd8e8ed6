"""Translate image corpora with a trained generator; every input gets exactly one manifest row.

    python -m jobs.infer --checkpoint s3://b/runs/h2z/export/generator.pt \\
        --input s3://b/corpus/horses/ --out s3://b/translated/h2z

Inputs: shard sets (a folder or _index.json URL) and raw image listings (a prefix, a glob, or a .txt
or .parquet file of URLs). The first worker lists them once and freezes the plan in OUT/_plan/:
units of --unit-size images of a listing or samples of a shard, every output key, and the job's
identity (inputs, model hash, output options); the other workers wait for it, and reruns read it
instead of listing again (worker 0 relists to find inputs that changed). Unit i belongs to
worker i % workers, where the worker comes from torchrun (RANK, WORLD_SIZE), a Kubernetes Indexed
Job (JOB_COMPLETION_INDEX, JOB_COMPLETIONS) or --worker-index/--num-workers. A unit writes its
images, then its manifest part OUT/manifest/part-%06d.parquet last (its existence is the commit); a
rerun skips committed units. When every unit is committed, OUT/_SUCCESS holds the totals.

A rerun with another model or other output options exits 2 before writing anything; so does a
rerun whose inputs list differently (unless --add-new-inputs or --skip-input-check). SIGTERM (or
Ctrl-C) stops taking batches, commits the units that are complete and exits 143 (130).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cut import CheckpointError, generator_from_checkpoint, read_checkpoint
from cut.inference import BatchTranslator, PendingBatch
from jobs.config import ConfigError, build
from jobs.runtime import available_cores, env_int, setup_logging
from pipeline import storage
from pipeline.corpus import WorkUnit
from pipeline.ingest import ListingError
from pipeline.keys import UnsafeKeyError
from pipeline.manifest import SUCCESS, committed_units, manifest_dir, read_manifest, write_part, write_success
from pipeline.plan import JobPlan, PlanError, worker_units
from pipeline.planner import obtain_plan
from pipeline.shards import ShardIndexError
from pipeline.translation_io import (
    OutputLayout,
    Preprocess,
    UnitBatches,
    error_record,
    pack_tar,
    sha256,
    write_output_index,
)

log = logging.getLogger("jobs.infer")

FORMATS = ("files", "shards")
IMAGE_FORMATS = ("png", "jpg", "webp")
PREPROCESS = ("official", "none", "shortside")


@dataclass
class InferConfig:
    checkpoint: str = ""
    inputs: list[str] = field(default_factory=list)
    out: str = ""
    format: str = "files"
    image_format: str = "png"
    quality: int = 95
    png_level: int = 1
    preprocess: str = "official"
    load_size: int = 256
    crop_size: int = 256
    max_pixels: int = 64 * 2**20
    batch_size: int | None = None
    workers: int | None = None
    encode_threads: int | None = None
    unit_size: int = 1000
    worker_index: int | None = None
    num_workers: int | None = None
    device: str = "auto"
    bf16: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    progress: bool = True
    plan_timeout: float = 3600.0
    check_inputs: bool = True
    add_new_inputs: bool = False


def wants_cuda(config: InferConfig) -> bool:
    return torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="our export (export/generator.pt) or latest_net_G.pth")
    p.add_argument(
        "--input", required=True, nargs="+", dest="inputs", metavar="URL", help="shard sets or listings"
    )
    p.add_argument("--out", required=True, help="output URL (images/, manifest/, _SUCCESS)")
    p.add_argument("--format", choices=FORMATS, default="files", help="write image files or shards")
    p.add_argument("--image-format", choices=IMAGE_FORMATS, default="png")
    p.add_argument(
        "--quality", type=int, default=95, help="JPEG/WebP quality, 1-100 (default: 95); PNG is lossless"
    )
    p.add_argument(
        "--png-level",
        type=int,
        default=1,
        help="PNG zlib level 0-9 (default: 1, about 2 ms for 256x256 with files the size of Pillow's "
        "level 1; 6 or more: files a few percent smaller, several times slower)",
    )
    p.add_argument(
        "--preprocess",
        choices=PREPROCESS,
        default="official",
        help="official: resize to the crop size as test.py; none: keep the size (network at a multiple "
        "of 4, output restored to the input size); shortside: shortest side to --load-size",
    )
    p.add_argument("--load-size", type=int, default=256)
    p.add_argument("--crop-size", type=int, default=256)
    p.add_argument(
        "--max-pixels", type=int, default=64 * 2**20, help="inputs with more pixels become error rows"
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 on CUDA, 1 on CPU (cache-bound)")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader processes that read and decode (default: a third of the usable cores on CUDA, "
        "1 on CPU)",
    )
    p.add_argument(
        "--encode-threads",
        type=int,
        default=None,
        help="threads that encode, hash and write outputs (default: half the usable cores on CUDA, 1 on CPU)",
    )
    p.add_argument(
        "--unit-size", type=int, default=1000, help="images (or shard samples) per work unit, at planning"
    )
    p.add_argument(
        "--worker-index", type=int, default=None, help="this worker (default: RANK or JOB_COMPLETION_INDEX)"
    )
    p.add_argument(
        "--num-workers", type=int, default=None, help="all workers (default: WORLD_SIZE or JOB_COMPLETIONS)"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the generator (CUDA)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument(
        "--plan-timeout",
        type=float,
        default=3600.0,
        help="seconds a worker waits for the plan another worker is making (default: 3600)",
    )
    p.add_argument(
        "--add-new-inputs",
        action="store_true",
        help="rerun: add inputs that appeared since the plan was made as new units",
    )
    p.add_argument(
        "--skip-input-check",
        dest="check_inputs",
        action="store_false",
        help="rerun: do not relist the inputs (worker 0 relists them by default to find changes)",
    )
    return p


def load_infer_config(args: argparse.Namespace) -> InferConfig:
    """The validated config of a parsed command line (ConfigError if a value is out of range)."""
    config = build(InferConfig, dict(vars(args)), "command line")
    if config.worker_index is None:
        config.worker_index = env_int("RANK", "JOB_COMPLETION_INDEX", default=0)
    if config.num_workers is None:
        config.num_workers = env_int("WORLD_SIZE", "JOB_COMPLETIONS", default=1)
    if config.batch_size is None:
        config.batch_size = 16 if wants_cuda(config) else 1
    cores = available_cores()
    if config.workers is None:
        config.workers = max(1, cores // 3) if wants_cuda(config) else 1
    if config.encode_threads is None:
        config.encode_threads = max(1, cores // 2) if wants_cuda(config) else 1
    if config.bf16 is None:
        config.bf16 = wants_cuda(config)
    if config.channels_last is None:
        config.channels_last = wants_cuda(config)
    checks = [
        ("--batch-size", config.batch_size >= 1, ">= 1"),
        ("--workers", config.workers >= 0, ">= 0"),
        ("--encode-threads", config.encode_threads >= 1, ">= 1"),
        ("--png-level", 0 <= config.png_level <= 9, "within 0..9"),
        ("--unit-size", config.unit_size >= 1, ">= 1"),
        ("--crop-size", config.crop_size >= 8 and config.crop_size % 4 == 0, "a multiple of 4, at least 8"),
        ("--load-size", config.load_size >= 8, ">= 8"),
        ("--quality", 1 <= config.quality <= 100, "within 1..100"),
        ("--num-workers", config.num_workers >= 1, ">= 1"),
        ("--worker-index", 0 <= config.worker_index < config.num_workers, "within 0..num-workers-1"),
        ("--plan-timeout", config.plan_timeout > 0, "> 0"),
    ]
    for flag, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {expected}")
    return config


# ------------------------------------------------------------------------------------------------ run
def job_identity(config: InferConfig, model_sha256: str) -> dict[str, Any]:
    """What makes two runs the same job: inputs as given, the model, and every option that changes
    the outputs (options that do not apply to the chosen modes are left out)."""
    identity: dict[str, Any] = {
        "inputs": [url.rstrip("/") or url for url in config.inputs],
        "model_sha256": model_sha256,
        "format": config.format,
        "image_format": config.image_format,
        "preprocess": config.preprocess,
        "max_pixels": config.max_pixels,
        "bf16": config.bf16,
    }
    if config.image_format != "png":
        identity["quality"] = config.quality
    else:
        identity["png_level"] = config.png_level
    if config.preprocess == "official":
        identity["crop_size"] = config.crop_size
    if config.preprocess == "shortside":
        identity["load_size"] = config.load_size
    return identity


DATA_STAGES = ("read", "decode", "preprocess")  # in the DataLoader workers
STAGES = (*DATA_STAGES, "model", "encode", "hash", "write", "manifest")


@dataclass
class _Unit:
    """A unit in flight in the main process: its finished rows and pending output writes."""

    writes: list[Future] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    tar_members: list[tuple[str, str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Launched:
    """A batch whose outputs are on their way from the device."""

    unit: WorkUnit
    meta: list[dict]
    shapes: list[tuple[int, ...]]
    pending: PendingBatch
    seconds: float = 0.0  # wall time spent launching it
    cpu: float = 0.0  # of it, CPU time of this thread


class Translator:
    """Runs this worker's units: the model on batches (one in flight on the device while the host
    handles the previous one), outputs encoded and written by a bounded thread pool, a unit's
    manifest part written once all its outputs are stored."""

    def __init__(self, config: InferConfig, stop: threading.Event | None = None) -> None:
        self.cfg = config
        use_cuda = wants_cuda(config)
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda given but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.backends.cudnn.benchmark = True  # batches mostly share one size
        data = storage.read_bytes(config.checkpoint)
        checkpoint = read_checkpoint(data, config.checkpoint)
        self.netG = generator_from_checkpoint(checkpoint, config.checkpoint).to(self.device)
        if config.channels_last:
            self.netG = self.netG.to(memory_format=torch.channels_last)
        forward = torch.compile(self.netG) if config.compile else self.netG
        self.translate = BatchTranslator(forward, self.device, bool(config.bf16), bool(config.channels_last))
        meta = checkpoint.get("metadata", {}) if isinstance(checkpoint, dict) else {}
        self.preset = str(meta.get("preset", "unknown"))
        self.model_sha256 = sha256(data)
        self.model_id = f"{config.checkpoint}#sha256={self.model_sha256}"
        self.layout = OutputLayout(
            config.out, config.format, config.image_format, config.quality, config.png_level
        )
        self.stop = stop or threading.Event()
        self.failed: list[int] = []
        self.unfinished: list[int] = []
        self.stats = {"ok": 0, "error": 0}
        # CPU seconds per stage over all images ("model": the main thread's CPU in device calls, all of
        # the model's on a CPU device, launches and copies on CUDA)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.elapsed = 0.0
        self._timing = threading.Lock()

    def _add_time(self, **seconds: float) -> None:
        with self._timing:
            for stage, value in seconds.items():
                self.seconds[stage] += value

    def _write_one(
        self, unit: WorkUnit, meta: dict, pixels: np.ndarray, model_ms: float, state: _Unit
    ) -> dict:
        """Encode one output and store it (a file, or a member of the unit's shard); returns its row."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            url = self.layout.image_url(unit, meta["key"])
        except UnsafeKeyError as exc:
            return error_record(
                meta["order"],
                meta["key"],
                meta["source_url"],
                "unsafe-key",
                str(exc),
                meta["input_bytes"],
                (meta["width"], meta["height"]),
            )
        data = self.layout.encode(pixels, meta["restore"])
        c1 = time.thread_time()
        digest = sha256(data)
        c2 = time.thread_time()
        out_h, out_w = (
            (pixels.shape[0], pixels.shape[1]) if meta["restore"] is None else meta["restore"][::-1]
        )
        row = {
            **{k: meta[k] for k in ("order", "key", "source_url", "width", "height", "input_bytes")},
            "output_url": url,
            "status": "ok",
            "out_width": out_w,
            "out_height": out_h,
            "output_bytes": len(data),
            "output_sha256": digest,
        }
        if self.cfg.format == "shards":
            sidecar = {
                k: row[k]
                for k in ("key", "source_url", "width", "height", "out_width", "out_height", "output_sha256")
            }
            sidecar.update(model_id=self.model_id, preset=self.preset)
            with state.lock:
                state.tar_members.append((meta["key"], self.cfg.image_format, data))
                state.tar_members.append((meta["key"], "json", json.dumps(sidecar, sort_keys=True).encode()))
        else:
            storage.write_bytes_atomic(url, data, durable=False)  # synced once per unit, before its part
        self._add_time(encode=c1 - c0, hash=c2 - c1, write=time.thread_time() - c2)
        row["elapsed_ms"] = meta["prep_ms"] + model_ms + 1000 * (time.perf_counter() - t0)
        return row

    def _commit(self, unit: WorkUnit, state: _Unit, errors: list[dict]) -> None:
        rows = state.rows + [f.result() for f in state.writes] + errors
        c0 = time.thread_time()
        if self.cfg.format == "shards" and state.tar_members:
            members = [(f"{key}.{ext}", data) for key, ext, data in sorted(state.tar_members)]
            storage.write_bytes_atomic(self.layout.shard_url(unit.index), pack_tar(members))
        elif self.cfg.format == "files":
            storage.sync_local(self.cfg.out)  # the outputs are on disk before the part says so
        rows.sort(key=lambda r: r["order"])
        for row in rows:
            row.update(
                model_id=self.model_id, preset=self.preset, worker=self.cfg.worker_index, unit=unit.index
            )
            row.setdefault("elapsed_ms", 0.0)
        write_part(self.cfg.out, unit.index, rows)
        self._add_time(manifest=time.thread_time() - c0)
        ok = sum(r["status"] == "ok" for r in rows)
        self.stats["ok"] += ok
        self.stats["error"] += len(rows) - ok

    def _device_error(self, meta: dict, shape: tuple[int, ...]) -> dict:
        detail = (
            f"a {meta['width']}x{meta['height']} input ({shape[-1]}x{shape[-2]} at the network) "
            f"does not fit in {self.device.type} memory at batch size 1"
        )
        log.error("%s: %s", meta["source_url"], detail)
        return error_record(
            meta["order"],
            meta["key"],
            meta["source_url"],
            "too-large-for-device",
            detail,
            meta["input_bytes"],
            (meta["width"], meta["height"]),
        )

    def run(self, units: list[WorkUnit]) -> None:
        """Translate `units`; returns early, leaving later units uncommitted, once `stop` is set."""
        cfg = self.cfg
        if not units:
            return
        pre = Preprocess(cfg.preprocess, cfg.load_size, cfg.crop_size, cfg.max_pixels)
        loader_workers = min(cfg.workers, len(units))
        loader = DataLoader(
            UnitBatches(units, pre, cfg.batch_size),
            batch_size=None,
            num_workers=loader_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if loader_workers else None,
        )
        by_index = {u.index: u for u in units}
        states: dict[int, _Unit] = {}
        pending = set(by_index)
        bar = tqdm(
            total=sum(u.expected for u in units), unit="img", disable=not cfg.progress, desc="translate"
        )
        start = last_log = time.perf_counter()
        done = 0
        threads = cfg.encode_threads
        # Outputs in memory are bounded: a batch waits for room before its images are handed over.
        room = threading.BoundedSemaphore(2 * cfg.batch_size + 2 * threads)
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="encode")
        batches = iter(loader)
        launched: _Launched | None = None
        try:
            while not self.stop.is_set():
                try:
                    msg = next(batches)
                except StopIteration:
                    break
                unit = by_index[msg["unit"]]
                states.setdefault(unit.index, _Unit())
                if "end" in msg:
                    count = self._hand_over(launched, states, pool, room) + len(msg["errors"])
                    launched = None
                    pending.discard(unit.index)
                    self._finish_unit(unit, states.pop(unit.index), msg["errors"])
                else:
                    t0, c0 = time.perf_counter(), time.thread_time()
                    shapes = [tuple(x.shape) for x in msg["x"]]
                    current = _Launched(unit, msg["meta"], shapes, self.translate.start(msg["x"]))
                    current.seconds, current.cpu = time.perf_counter() - t0, time.thread_time() - c0
                    count = self._hand_over(launched, states, pool, room)
                    launched = current
                    self._add_time(**{s: sum(m["cpu"][s] for m in msg["meta"]) for s in DATA_STAGES})
                done += count
                bar.update(count)
                bar.set_postfix(units=f"{len(units) - len(pending)}/{len(units)}")
                if time.perf_counter() - last_log > 30:
                    last_log = time.perf_counter()
                    log.info("%d of %d images, %.1f images/s", done, bar.total, done / (last_log - start))
        except RuntimeError:
            if not self.stop.is_set():  # DataLoader workers die with the job on SIGTERM/SIGINT
                raise
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
            del batches
        self.unfinished = sorted(pending)
        self.elapsed = time.perf_counter() - start

    def _hand_over(
        self,
        launched: _Launched | None,
        states: dict[int, _Unit],
        pool: ThreadPoolExecutor,
        room: threading.BoundedSemaphore,
    ) -> int:
        """Wait for a launched batch's outputs and queue their encoding; returns its image count."""
        if launched is None:
            return 0
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs = launched.pending.result()
        seconds = launched.seconds + time.perf_counter() - t0
        self._add_time(model=launched.cpu + time.thread_time() - c0)
        model_ms = 1000 * seconds / len(outputs)
        state = states[launched.unit.index]
        for meta, shape, pixels in zip(launched.meta, launched.shapes, outputs, strict=True):
            if pixels is None:
                state.rows.append(self._device_error(meta, shape))
                continue
            room.acquire()
            future = pool.submit(self._write_one, launched.unit, meta, pixels.numpy(), model_ms, state)
            future.add_done_callback(lambda _: room.release())
            state.writes.append(future)
        return len(outputs)

    def _finish_unit(self, unit: WorkUnit, state: _Unit, errors: list[dict]) -> None:
        try:
            self._commit(unit, state, errors)
        except Exception as exc:  # storage trouble after retries: report, keep going
            self.failed.append(unit.index)
            log.error("unit %d (%s) failed and stays uncommitted: %s", unit.index, unit.source, exc)


def finish(out: str, plan: JobPlan, layout: OutputLayout, model_id: str) -> str | None:
    """If every unit of the plan is committed: the output shard index (for --format shards), then
    OUT/_SUCCESS with the totals. Returns the _SUCCESS URL, or None while units are missing."""
    done = committed_units(out)
    if any(i not in done for i in range(plan.units)):
        return None
    success = storage.join(out, SUCCESS)
    if storage.exists(success):
        return success
    table = read_manifest(out, columns=["status", "unit"])
    status = table.column("status").to_pylist()
    if layout.format == "shards":
        per_unit = Counter(
            u for u, s in zip(table.column("unit").to_pylist(), status, strict=True) if s == "ok"
        )
        write_output_index(layout, dict(per_unit), {"prefix": "part", "model_id": model_id})
    totals = {
        "units": plan.units,
        "rows": len(status),
        "ok": status.count("ok"),
        "error": status.count("error"),
        "plan_revision": plan.revision,
        "model_id": model_id,
    }
    return write_success(out, totals)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_infer_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(config.worker_index)
    stop = StopSignal()
    if threading.current_thread() is not threading.main_thread():
        return _run(config, stop)
    previous = {sig: signal.signal(sig, stop.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _run(config, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopSignal(threading.Event):
    """Set by SIGTERM or SIGINT (a second SIGINT interrupts at once); remembers which came first."""

    signum = signal.SIGTERM

    def handle(self, signum: int, _frame: object) -> None:
        if self.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.is_set():
            self.signum = signal.Signals(signum)
            log.warning("%s: finishing the units that are complete, then stopping", self.signum.name)
        self.set()


def _run(config: InferConfig, stop: StopSignal) -> int:
    try:
        translator = Translator(config, stop)
        plan = obtain_plan(
            config.out,
            config.inputs,
            job_identity(config, translator.model_sha256),
            config.unit_size,
            worker=config.worker_index,
            check_inputs=config.check_inputs,
            add_new_inputs=config.add_new_inputs,
            timeout=config.plan_timeout,
        )
    except (PlanError, ShardIndexError, ListingError) as exc:
        log.error("%s", exc)
        return 2
    except (OSError, CheckpointError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    done = committed_units(config.out)
    mine = [u for u in worker_units(plan, config.worker_index, config.num_workers) if u.index not in done]
    log.info(
        "worker %d of %d: %d of %d units to do (%d already committed), model %s",
        config.worker_index,
        config.num_workers,
        len(mine),
        plan.units,
        len(done),
        translator.model_id,
    )
    translator.run(mine)
    images = translator.stats["ok"] + translator.stats["error"]
    success = finish(config.out, plan, translator.layout, translator.model_id)
    print(
        f"ok {translator.stats['ok']}, errors {translator.stats['error']}, "
        f"{images / max(translator.elapsed, 1e-9):.1f} images/s; manifest: {manifest_dir(config.out)}"
        + (f"; all {plan.units} units committed: {success}" if success else "")
    )
    if translator.failed:
        log.error("units %s failed; rerun this worker to retry them", translator.failed)
        return 1
    if translator.unfinished:
        log.warning(
            "stopped by %s with units %s uncommitted; rerun to finish them",
            stop.signum.name,
            translator.unfinished,
        )
        return 128 + stop.signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
