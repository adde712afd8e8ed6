"""Translate image corpora with a trained generator; every input gets exactly one manifest row.

    python -m jobs.infer --checkpoint s3://b/runs/h2z/export/generator.pt \\
        --input s3://b/corpus/horses/ --out s3://b/translated/h2z

Inputs: shard sets (a folder or _index.json URL) and raw image listings (a prefix, a glob, or a .txt
or .parquet file of URLs). The work is cut into units (one input shard, or a chunk of --unit-size
images of the sorted listing); unit i belongs to worker i % workers, where the worker comes from
torchrun (RANK, WORLD_SIZE), a Kubernetes Indexed Job (JOB_COMPLETION_INDEX, and JOB_COMPLETIONS
set by the manifest) or --worker-index/--num-workers. A unit writes its images, then its manifest
part OUT/manifest/part-%06d.parquet last (its existence is the commit); a rerun skips committed
units. When every unit is committed, OUT/_SUCCESS holds the totals.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cut import CheckpointError, generator_from_checkpoint, read_checkpoint
from jobs.config import ConfigError, build
from jobs.runtime import env_int, setup_logging
from pipeline import storage
from pipeline.corpus import WorkUnit, plan_units
from pipeline.manifest import committed_units, manifest_dir, read_manifest, write_part, write_success
from pipeline.translation_io import Preprocess, UnitBatches, encode_image, pack_tar, sha256, to_uint8

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
    preprocess: str = "official"
    load_size: int = 256
    crop_size: int = 256
    max_pixels: int = 64 * 2**20
    batch_size: int | None = None
    workers: int = 4
    unit_size: int = 1000
    worker_index: int | None = None
    num_workers: int | None = None
    device: str = "auto"
    bf16: bool | None = None
    channels_last: bool | None = None
    compile: bool = False
    progress: bool = True


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
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
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
    p.add_argument("--workers", type=int, default=4, help="DataLoader decode workers")
    p.add_argument("--unit-size", type=int, default=1000, help="images per work unit of a raw listing")
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
    checks = [
        ("--batch-size", config.batch_size >= 1, ">= 1"),
        ("--workers", config.workers >= 0, ">= 0"),
        ("--unit-size", config.unit_size >= 1, ">= 1"),
        ("--crop-size", config.crop_size >= 8 and config.crop_size % 4 == 0, "a multiple of 4, at least 8"),
        ("--load-size", config.load_size >= 8, ">= 8"),
        ("--quality", 1 <= config.quality <= 100, "within 1..100"),
        ("--num-workers", config.num_workers >= 1, ">= 1"),
        ("--worker-index", 0 <= config.worker_index < config.num_workers, "within 0..num-workers-1"),
    ]
    for flag, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {expected}")
    return config


# ------------------------------------------------------------------------------------------------ run
@dataclass
class _Unit:
    """A unit in flight in the main process: its finished rows and pending output writes."""

    rows: list[dict] = field(default_factory=list)
    writes: list[Future] = field(default_factory=list)
    tar_members: list[tuple[str, bytes]] = field(default_factory=list)


class Translator:
    """Runs this worker's units: model on batches, outputs and manifest parts written as units finish."""

    def __init__(self, config: InferConfig) -> None:
        self.cfg = config
        use_cuda = wants_cuda(config)
        if use_cuda and not torch.cuda.is_available():
            raise ConfigError("--device cuda given but no CUDA device is available")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
        self.bf16 = use_cuda if config.bf16 is None else config.bf16
        self.channels_last = use_cuda if config.channels_last is None else config.channels_last
        data = storage.read_bytes(config.checkpoint)
        checkpoint = read_checkpoint(data, config.checkpoint)
        self.netG = generator_from_checkpoint(checkpoint, config.checkpoint).to(self.device)
        if self.channels_last:
            self.netG = self.netG.to(memory_format=torch.channels_last)
        self.forward = torch.compile(self.netG) if config.compile else self.netG
        meta = checkpoint.get("metadata", {}) if isinstance(checkpoint, dict) else {}
        self.preset = str(meta.get("preset", "unknown"))
        self.model_id = f"{config.checkpoint}#sha256={sha256(data)}"
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="encode")
        self.failed: list[int] = []
        self.stats = {"ok": 0, "error": 0}

    def _shard_url(self, unit: WorkUnit) -> str:
        return storage.join(self.cfg.out, "shards", f"part-{unit.index:06d}.tar")

    def _output_url(self, unit: WorkUnit, key: str) -> str:
        cfg = self.cfg
        if cfg.format == "shards":
            return f"{self._shard_url(unit)}#{key}.{cfg.image_format}"
        return storage.join(cfg.out, "images", str(unit.input_index), f"{key}.{cfg.image_format}")

    @torch.inference_mode()
    def _translate(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            y = self.forward(x)
        return to_uint8(y).permute(0, 2, 3, 1).cpu().numpy()

    def _write_one(
        self, unit: WorkUnit, meta: dict, pixels: np.ndarray, model_ms: float, state: _Unit
    ) -> dict:
        """Encode one output and store it (a file, or a member of the unit's shard); returns its row."""
        t0 = time.perf_counter()
        cfg = self.cfg
        data = encode_image(pixels, cfg.image_format, cfg.quality, meta["restore"])
        url = self._output_url(unit, meta["key"])
        if cfg.format == "shards":
            state.tar_members.append((f"{meta['key']}.{cfg.image_format}", data))
        else:
            storage.write_bytes_atomic(url, data)
        out_h, out_w = (
            (pixels.shape[0], pixels.shape[1]) if meta["restore"] is None else meta["restore"][::-1]
        )
        return {
            **{k: meta[k] for k in ("order", "key", "source_url", "width", "height", "input_bytes")},
            "output_url": url,
            "status": "ok",
            "error": None,
            "out_width": out_w,
            "out_height": out_h,
            "output_bytes": len(data),
            "output_sha256": sha256(data),
            "elapsed_ms": meta["prep_ms"] + model_ms + 1000 * (time.perf_counter() - t0),
        }

    def _commit(self, unit: WorkUnit, state: _Unit, errors: list[dict]) -> None:
        rows = [f.result() for f in state.writes] + errors
        if self.cfg.format == "shards":
            members = sorted(state.tar_members)
            storage.write_bytes_atomic(self._shard_url(unit), pack_tar(members))
        rows.sort(key=lambda r: r["order"])
        for row in rows:
            row.update(
                model_id=self.model_id, preset=self.preset, worker=self.cfg.worker_index, unit=unit.index
            )
            row.setdefault("elapsed_ms", 0.0)
        write_part(self.cfg.out, unit.index, rows)
        ok = sum(r["status"] == "ok" for r in rows)
        self.stats["ok"] += ok
        self.stats["error"] += len(rows) - ok

    def run(self, units: list[WorkUnit]) -> None:
        cfg = self.cfg
        pre = Preprocess(cfg.preprocess, cfg.load_size, cfg.crop_size, cfg.max_pixels)
        loader = DataLoader(
            UnitBatches(units, pre, cfg.batch_size),
            batch_size=None,
            num_workers=min(cfg.workers, len(units)),
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if cfg.workers else None,
        )
        by_index = {u.index: u for u in units}
        states: dict[int, _Unit] = {}
        bar = tqdm(
            total=sum(u.expected for u in units), unit="img", disable=not cfg.progress, desc="translate"
        )
        start, last_log, done = time.perf_counter(), time.perf_counter(), 0
        for msg in loader:
            unit = by_index[msg["unit"]]
            state = states.setdefault(unit.index, _Unit())
            if "end" in msg:
                try:
                    self._commit(unit, states.pop(unit.index), msg["errors"])
                except Exception as exc:  # storage trouble after retries: report, keep going
                    self.failed.append(unit.index)
                    log.error("unit %d (%s) failed and stays uncommitted: %s", unit.index, unit.source, exc)
                done += msg["count"]
                bar.update(msg["count"])
                bar.set_postfix(units=f"{len(units) - len(states)}/{len(units)}")
                if time.perf_counter() - last_log > 30:
                    last_log = time.perf_counter()
                    log.info("%d images, %.1f images/s", done, done / (last_log - start))
                continue
            t0 = time.perf_counter()
            pixels = self._translate(msg["x"])
            model_ms = 1000 * (time.perf_counter() - t0) / len(pixels)
            for meta, image in zip(msg["meta"], pixels, strict=True):
                state.writes.append(self.pool.submit(self._write_one, unit, meta, image, model_ms, state))
        bar.close()
        self.pool.shutdown()
        self.elapsed = time.perf_counter() - start


def _finish(out: str, total_units: int) -> str | None:
    """Write _SUCCESS with the totals if every unit of the job is committed; returns its URL."""
    if len(committed_units(out)) != total_units:
        return None
    status = read_manifest(out, columns=["status"]).column("status").to_pylist()
    totals = {
        "units": total_units,
        "rows": len(status),
        "ok": status.count("ok"),
        "error": status.count("error"),
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
    try:
        units = plan_units(config.inputs, config.unit_size)
        translator = Translator(config)
    except (FileNotFoundError, CheckpointError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    done = committed_units(config.out)
    mine = [u for u in units if u.index % config.num_workers == config.worker_index and u.index not in done]
    log.info(
        "worker %d of %d: %d of %d units to do (%d already committed), model %s",
        config.worker_index,
        config.num_workers,
        len(mine),
        len(units),
        len(done),
        translator.model_id,
    )
    translator.run(mine)
    images = translator.stats["ok"] + translator.stats["error"]
    success = _finish(config.out, len(units))
    print(
        f"ok {translator.stats['ok']}, errors {translator.stats['error']}, "
        f"{images / max(translator.elapsed, 1e-9):.1f} images/s; manifest: {manifest_dir(config.out)}"
        + (f"; all {len(units)} units committed: {success}" if success else "")
    )
    if translator.failed:
        log.error("units %s failed; rerun this worker to retry them", translator.failed)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
