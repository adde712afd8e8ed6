"""The work of one jobs.infer worker: its units through the model, outputs written, parts committed.

Read in the order a batch travels: `Translator.__init__` loads the model (torch, or onnxruntime);
`run` takes batches that DataLoader workers read, decoded and preprocessed
(`pipeline.translation_io.UnitBatches`) and starts each on the device, while `_hand_over` gives the
previous batch's outputs to a bounded pool of encoder threads (`_write_one`: encode, hash, write);
once all of a unit's outputs are stored, `_commit` writes its manifest part. `finish` writes
`_SUCCESS` (and, for shard outputs, their index) once every unit of the plan is committed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cut import CheckpointError, generator_from_checkpoint, model_card, read_checkpoint
from cut.export import ExportedModel, checked_onnx_card
from cut.inference import BatchTranslator, PendingBatch
from cut.tiling import TiledGenerator, default_tile_size, tileable
from jobs.config import ConfigError
from jobs.infer_config import InferConfig, wants_cuda
from jobs.runtime import available_memory
from jobs.signals import StopSignals
from pipeline import storage
from pipeline.checkpoints import resolve_generator_url
from pipeline.corpus import WorkUnit
from pipeline.keys import UnsafeKeyError
from pipeline.manifest import SUCCESS, committed_units, read_manifest, write_part, write_success
from pipeline.plan import JobPlan
from pipeline.spill import SpillArena
from pipeline.table_output import TABLE_FORMATS, write_unit
from pipeline.translation_io import (
    FORMAT_MAX_SIDE,
    OutputLayout,
    Preprocess,
    UnitBatches,
    error_record,
    out_of_memory,
    pack_tar,
    sha256,
    write_output_index,
)

log = logging.getLogger("jobs.infer")


def device_memory(device: torch.device) -> int:
    """Bytes of memory of ``device``: the GPU's, or what this process may use for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return available_memory()


DATA_STAGES = ("read", "decode", "preprocess")  # in the DataLoader workers
STAGES = (*DATA_STAGES, "model", "encode", "hash", "write", "manifest")


@dataclass
class _Unit:
    """A unit in flight in the main process: its finished rows and pending output writes."""

    writes: list[Future] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    tar_members: list[tuple[str, str, bytes]] = field(default_factory=list)
    images: dict[int, bytes] = field(default_factory=dict)  # table formats: encoded outputs by order
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _Launched:
    """A batch whose outputs are on their way from the device."""

    unit: WorkUnit
    meta: list[dict]
    shape: tuple[int, ...]  # of each image at the network (a batch holds one size)
    pending: PendingBatch
    seconds: float = 0.0  # wall time spent launching it
    cpu: float = 0.0  # of it, CPU time of this thread


class Progress:
    """The progress bar (on a terminal) and a log line every 30 s, over the images of `units`."""

    def __init__(self, cfg: InferConfig, units: list[WorkUnit]) -> None:
        on_terminal = cfg.progress and sys.stderr.isatty()  # in a log file a bar is a carriage-return stream
        self.units = len(units)
        self.bar = tqdm(total=sum(u.expected for u in units), unit="img", disable=not on_terminal,
                        desc="translate")
        self.start = self.last_log = time.perf_counter()
        self.done = 0

    def update(self, images: int, units_done: int) -> None:
        self.done += images
        self.bar.update(images)
        self.bar.set_postfix(units=f"{units_done}/{self.units}")
        if time.perf_counter() - self.last_log > 30:
            self.last_log = time.perf_counter()
            log.info("%d of %d images, %.1f images/s", self.done, self.bar.total,
                     self.done / (self.last_log - self.start))

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def close(self) -> None:
        self.bar.close()


class Translator:
    """Runs this worker's units: the model on batches (one in flight on the device while the host
    handles the previous one), outputs encoded and written by a bounded thread pool, a unit's
    manifest part written once all its outputs are stored."""

    def __init__(
        self, config: InferConfig, stop: StopSignals | None = None, device: torch.device | None = None
    ) -> None:
        """``device`` overrides --device: the Ray executor's driver loads the model on its CPU only to
        know the job's model (its id, card and input geometry); its actors run it."""
        self.cfg = config
        use_cuda = wants_cuda(config) if device is None else device.type == "cuda"
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda given but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device or (torch.device("cuda", local_rank) if use_cuda else torch.device("cpu"))
        if use_cuda:
            torch.backends.cudnn.benchmark = True  # batches mostly share one size
        if config.engine == "onnxruntime":
            data, checkpoint, forward = self._onnx_model(config.checkpoint, use_cuda)
        else:
            data, checkpoint, forward = self._torch_model(config)
        self.translate = BatchTranslator(forward, self.device, bool(config.bf16), bool(config.channels_last))
        meta = checkpoint.get("metadata", {}) if isinstance(checkpoint, dict) else {}
        self.model_sha256 = sha256(data)
        if self.output_channels > 4 and config.image_format != "npy":
            raise ConfigError(f"the model writes {self.output_channels} channels, which no image format "
                              f"holds: use --image-format npy")
        self._init_outputs(
            config,
            f"{self.checkpoint_url}#sha256={self.model_sha256}",
            str(meta.get("preset") or self.card.get("preset") or "unknown"),
            stop,
        )

    @classmethod
    def for_outputs(cls, config: InferConfig, model_id: str, preset: str) -> Translator:
        """A Translator without a model, for the stages after it: `_write_one` (encode, hash, write an
        output) and `_commit` (Ray's encode tasks, and its driver's commits)."""
        self = cls.__new__(cls)
        self.cfg = config
        self.tile = 0
        self._init_outputs(config, model_id, preset, None)
        return self

    def _init_outputs(
        self, config: InferConfig, model_id: str, preset: str, stop: StopSignals | None
    ) -> None:
        """The state of the stages after the model: where outputs go, the rows' model columns, counts."""
        self.model_id = model_id
        self.preset = preset
        self.squashed = 0  # non-square inputs resized to a square (--preprocess official)
        self.tiled = 0  # inputs larger than the tile size, translated tile by tile
        self.smaller = 0  # outputs with fewer pixels than their input
        self.layout = OutputLayout(
            config.out, config.format, config.image_format, config.quality, config.png_level
        )
        self.stop = stop or StopSignals()
        self.failed: list[int] = []
        self.unfinished: list[int] = []
        self.stats = {"ok": 0, "error": 0}
        self.dropped: Counter[str] = Counter()  # outputs whose format could not hold alpha / 16 bits
        # CPU seconds per stage over all images ("model": the main thread's CPU in device calls, all of
        # the model's on a CPU device, launches and copies on CUDA)
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.elapsed = 0.0
        self._timing = threading.Lock()

    def _torch_model(self, config: InferConfig) -> tuple[bytes, object, TiledGenerator]:
        """The generator of --checkpoint on the device, tiling inputs larger than --tile-size (the
        host activations of a tiled image over 1/16 of the machine's memory spill to local disk)."""
        self.checkpoint_url = resolve_generator_url(config.checkpoint)
        data = storage.read_bytes(self.checkpoint_url)
        checkpoint = read_checkpoint(data, self.checkpoint_url)
        self.card = model_card(checkpoint, self.checkpoint_url)
        netG = generator_from_checkpoint(checkpoint, self.checkpoint_url).to(self.device)
        self.input_channels, self.output_channels = netG.input_nc, netG.output_nc
        self.size_multiple = int(getattr(netG, "size_multiple", 4))
        if config.channels_last:
            netG = netG.to(memory_format=torch.channels_last)
        tile = config.tile_size
        if tile is None:  # 0 (whole images) for a generator tiles cannot reproduce exactly
            tile = default_tile_size(netG, device_memory(self.device))
        elif tile and not tileable(netG):
            raise ConfigError(f"--tile-size {tile}: {self.checkpoint_url} holds a generator that tiles "
                              f"cannot translate exactly (only a ResNet with instance norm or none); "
                              f"use --tile-size 0 or leave it unset")
        # The tile size is news only once an input is tiled (said at the end of the run), or when the
        # model cannot be tiled at all (a large input may then not fit).
        if tile:
            log.debug("inputs larger than %d network pixels on a side are translated tile by tile (%s)", tile,
                      "--tile-size" if config.tile_size is not None else "from the device's memory")
        elif config.tile_size is None:
            log.info("every input is translated whole: tiles cannot reproduce this generator exactly (only "
                     "a ResNet with instance norm or none)")
        else:
            log.debug("every input is translated whole (--tile-size 0)")
        self.tile = tile
        spool = os.path.join(tempfile.gettempdir(), "cut-pipeline-spool", f"{os.getpid()}-tiles")
        spill = SpillArena(spool, threshold=available_memory() // 16)
        whole = torch.compile(netG) if config.compile else None
        return data, checkpoint, TiledGenerator(netG, tile, whole, spill.empty)

    def _onnx_model(self, url: str, use_cuda: bool) -> tuple[bytes, dict, ExportedModel]:
        """An ONNX export (jobs.export: its file, or its folder) run by onnxruntime, CUDA execution
        provider first when a GPU is wanted; tensors stay on the host (onnxruntime moves them)."""
        self.checkpoint_url = storage.join(url, "generator.onnx") if storage.is_dir(url) else url
        data = storage.read_bytes(self.checkpoint_url)
        providers = ("CUDAExecutionProvider",) * use_cuda + ("CPUExecutionProvider",)
        try:
            model = ExportedModel(data, "onnx", providers)
        except Exception as exc:  # onnxruntime's own errors (InvalidProtobuf, Fail, ...) have no base
            raise CheckpointError(f"{self.checkpoint_url}: not an ONNX model onnxruntime can run "
                                  f"({type(exc).__name__}: {exc})") from exc
        self.device = torch.device("cpu")
        self.card = checked_onnx_card(data, self.checkpoint_url)  # finite weights, a sane card
        self.input_channels, self.output_channels = model.input_nc, model.output_nc
        self.size_multiple = 4
        self.tile = 0  # an ONNX graph runs whole
        log.info("engine onnxruntime: %s with %s", self.checkpoint_url, ", ".join(model.providers))
        return data, {}, model

    def preprocess(self) -> Preprocess:
        """How this model's inputs are read, decoded and sized (`UnitBatches`), wherever that runs."""
        cfg = self.cfg
        # A ResNet generator takes sides of 8 or more; a U-Net or StyleGAN2 one, sides of its multiple.
        return Preprocess(cfg.preprocess, cfg.load_size, cfg.crop_size, cfg.max_pixels, self.input_channels,
                          self.size_multiple, max(8, self.size_multiple),
                          FORMAT_MAX_SIDE.get(cfg.image_format))

    def run(self, units: list[WorkUnit]) -> None:
        """Translate `units`; returns early, leaving later units uncommitted, once `stop` is set."""
        cfg = self.cfg
        if not units:
            return
        loader_workers = min(cfg.workers, len(units))
        loader = DataLoader(
            UnitBatches(units, self.preprocess(), cfg.batch_size),
            batch_size=None,
            num_workers=loader_workers,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if loader_workers else None,
        )
        by_index = {u.index: u for u in units}
        states: dict[int, _Unit] = {}
        pending = set(by_index)
        progress = Progress(cfg, units)
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
                    current = self._launch(unit, msg)
                    count = self._hand_over(launched, states, pool, room)
                    launched = current
                progress.update(count, len(units) - len(pending))
        except RuntimeError:
            if not self.stop.is_set():  # DataLoader workers die with the job on SIGTERM/SIGINT
                raise
        finally:
            progress.close()
            pool.shutdown(wait=True, cancel_futures=True)
            del batches
        self.unfinished = sorted(pending)
        self.elapsed = progress.elapsed()
        self.report()

    def report(self) -> None:
        """Log what the run did to some inputs (after the run, once, whichever executor ran it)."""
        cfg = self.cfg
        for what, count in sorted(self.dropped.items()):
            log.warning("%d outputs lost their %s: --image-format %s cannot store it (the manifest's "
                        "`dropped` column names them); png keeps alpha and 16 bits",
                        count, what, cfg.image_format)
        if self.tiled:
            log.info("inputs larger than %d network pixels on a side are translated tile by tile (exactly; "
                     "%s): %d in this run", self.tile,
                     "--tile-size" if cfg.tile_size is not None else "a size from the device's memory, "
                     "--tile-size sets it", self.tiled)
        if self.smaller:
            log.info("%d outputs are smaller than their inputs (--preprocess %s); --preprocess none keeps "
                     "each input's size", self.smaller, cfg.preprocess)
        if self.squashed:
            log.warning(
                "%d inputs were not square and were squashed to %dx%d (--preprocess official, as the "
                "official test does); --preprocess shortside or none keeps their aspect ratio",
                self.squashed,
                cfg.crop_size,
                cfg.crop_size,
            )

    def _launch(self, unit: WorkUnit, msg: dict) -> _Launched:
        """Start a batch of `UnitBatches` on the device."""
        t0, c0 = time.perf_counter(), time.thread_time()
        shape = tuple(msg["x"].shape[1:])
        launched = _Launched(unit, msg["meta"], shape, self.translate.start(msg["x"]))
        launched.seconds, launched.cpu = time.perf_counter() - t0, time.thread_time() - c0
        self._add_time(**{s: sum(m["cpu"][s] for m in msg["meta"]) for s in DATA_STAGES})
        return launched

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
        outputs, model_ms = self._outputs(launched)
        state = states[launched.unit.index]
        for meta, pixels in zip(launched.meta, outputs, strict=True):
            row = self._unwritable(meta, pixels, launched.shape)
            if row is not None:
                state.rows.append(row)
                continue
            room.acquire()
            future = pool.submit(self._write_one, launched.unit, meta, pixels.numpy(), model_ms, state)
            future.add_done_callback(lambda _: room.release())
            state.writes.append(future)
        return len(outputs)

    def _outputs(self, launched: _Launched) -> tuple[list[torch.Tensor | None], float]:
        """A launched batch's outputs (None for an image the device could not take) and the model's
        milliseconds per image."""
        t0, c0 = time.perf_counter(), time.thread_time()
        outputs = launched.pending.result()
        seconds = launched.seconds + time.perf_counter() - t0
        self._add_time(model=launched.cpu + time.thread_time() - c0)
        if self.tile and max(launched.shape[-2:]) > self.tile:
            self.tiled += len(outputs)
        return outputs, 1000 * seconds / len(outputs)

    def _unwritable(self, meta: dict, pixels: torch.Tensor | None, shape: tuple[int, ...]) -> dict | None:
        """The row of an input the device gave no output for, else None (to be written); counts the
        inputs --preprocess official squashed."""
        if self.cfg.preprocess == "official" and abs(meta["width"] - meta["height"]) > 0.02 * meta["height"]:
            self.squashed += 1
        return self._device_error(meta, shape) if pixels is None else None

    def _write_one(
        self, unit: WorkUnit, meta: dict, pixels: np.ndarray, model_ms: float, state: _Unit
    ) -> dict:
        """Encode one output and store it (a file, or a member of the unit's shard); returns its row."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            url = self.layout.image_url(unit, meta["key"])
        except UnsafeKeyError as exc:
            return self._error_row(meta, "unsafe-key", str(exc))
        alpha = None if meta["alpha"] is None else meta["alpha"].numpy()
        try:
            encoded = self.layout.encode(pixels, meta["restore"], alpha, meta["box"])
        except Exception as exc:  # an allocation for this one output: its row, not the unit's failure
            if not out_of_memory(exc):
                raise
            return self._error_row(meta, "out-of-memory", f"encoding the output: {type(exc).__name__}: {exc}")
        data = encoded.data
        c1 = time.thread_time()
        digest = sha256(data)
        c2 = time.thread_time()
        left, top, right, bottom = meta["box"]
        out_w, out_h = meta["restore"] or (right - left, bottom - top)
        row = {
            **{k: meta[k] for k in ("order", "key", "source_url", "width", "height", "input_bytes")},
            "columns": meta.get("columns"),  # a table row's kept columns
            "output_url": url,
            "status": "ok",
            "out_width": out_w,
            "out_height": out_h,
            "output_bytes": len(data),
            "output_sha256": digest,
            "source_mode": meta["source_mode"],
            "output_mode": encoded.mode,
            "dropped": ",".join(encoded.dropped) or None,
        }
        if encoded.dropped:
            with self._timing:
                self.dropped.update(encoded.dropped)
        if self.cfg.format == "shards":
            sidecar = {
                k: row[k]
                for k in ("key", "source_url", "width", "height", "out_width", "out_height", "output_sha256",
                          "output_mode")
            }
            sidecar.update(model_id=self.model_id, preset=self.preset)
            with state.lock:
                state.tar_members.append((meta["key"], self.cfg.image_format, data))
                state.tar_members.append((meta["key"], "json", json.dumps(sidecar, sort_keys=True).encode()))
        elif self.cfg.format in TABLE_FORMATS:
            with state.lock:
                state.images[meta["order"]] = data
        else:
            storage.write_bytes_atomic(url, data, durable=False)  # synced once per unit, before its part
        self._add_time(encode=c1 - c0, hash=c2 - c1, write=time.thread_time() - c2)
        row["elapsed_ms"] = meta["prep_ms"] + model_ms + 1000 * (time.perf_counter() - t0)
        return row

    def _finish_unit(self, unit: WorkUnit, state: _Unit, errors: list[dict]) -> None:
        try:
            self._commit(unit, state, errors)
        except Exception as exc:  # storage trouble after retries: report, keep going
            self.failed.append(unit.index)
            log.error("unit %d (%s) failed and stays uncommitted: %s", unit.index, unit.source, exc)

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
        if self.cfg.format in TABLE_FORMATS:  # the unit's table rows, then the part that commits them
            rows = write_unit(self.cfg.out, self.cfg.format, unit.index, rows, state.images,
                              self.cfg.image_format)
        write_part(self.cfg.out, unit.index, rows)
        self._add_time(manifest=time.thread_time() - c0)
        ok = sum(r["status"] == "ok" for r in rows)
        self.smaller += sum(r["out_width"] * r["out_height"] < r["width"] * r["height"] for r in rows
                            if r["status"] == "ok")
        self.stats["ok"] += ok
        self.stats["error"] += len(rows) - ok

    def _device_error(self, meta: dict, shape: tuple[int, ...]) -> dict:
        detail = (
            f"a {meta['width']}x{meta['height']} input ({shape[-1]}x{shape[-2]} at the network) "
            f"does not fit in {self.device.type} memory at batch size 1"
        )
        log.error("%s: %s", meta["source_url"], detail)
        return self._error_row(meta, "too-large-for-device", detail)

    @staticmethod
    def _error_row(meta: dict, code: str, detail: str) -> dict:
        """The manifest row of an input that decoded but got no output."""
        dims = (meta["width"], meta["height"])
        return error_record(
            meta["order"], meta["key"], meta["source_url"], code, detail, meta["input_bytes"], dims,
            meta.get("columns"),
        )

    def _add_time(self, **seconds: float) -> None:
        with self._timing:
            for stage, value in seconds.items():
                self.seconds[stage] += value


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
