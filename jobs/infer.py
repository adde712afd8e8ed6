"""Translate image corpora with a trained generator; every input gets exactly one manifest row.

    python -m jobs.infer --checkpoint s3://b/runs/h2z/export/generator.pt \\
        --input s3://b/corpus/horses/ --out s3://b/translated/h2z

Inputs: shard sets (a folder or _index.json URL), raw image listings (a prefix, a glob, or a .txt
or .parquet file of URLs), and tables of encoded images: a Parquet dataset (a file, a folder or
prefix of part files, hive k=v folders, a glob) or a Delta table, planned from the Parquet footers
(--image-column, --key-column, --keep-columns, --table-version). The first worker lists them once
and freezes the plan in OUT/_plan/: units of --unit-size images of a listing, samples of a shard or
rows of a table's part file (whole row groups), every output key, and the job's
identity (inputs, model hash, output options); the other workers wait for it, and reruns read it
instead of listing again (worker 0 relists to find inputs that changed). Unit i belongs to
worker i % workers, where the worker comes from torchrun (RANK, WORLD_SIZE), a Kubernetes Indexed
Job (JOB_COMPLETION_INDEX, JOB_COMPLETIONS) or --worker-index/--num-workers. A unit writes its
images, then its manifest part OUT/manifest/part-%06d.parquet last (its existence is the commit); a
rerun skips committed units. When every unit is committed, OUT/_SUCCESS holds the totals.

A rerun with another model or other output options exits 2 before writing anything; so does a
rerun whose inputs list differently (unless --add-new-inputs or --skip-input-check), and so do a
checkpoint that fails its checks, a missing input, a bad flag, and a table that cannot be read as
asked (no single image column, a column of the wrong type, part files whose schemas differ, a part
file without a readable footer, a Delta version that is gone); a checkpoint not there (yet),
storage that stays unreachable or a unit that could not be written exits 1 (a rerun may succeed).

--executor ray runs the same plan on a Ray cluster (--ray-address, else RAY_ADDRESS, else a local Ray
instance started and stopped by the job) as a Ray Data pipeline: CPU tasks read, decode, encode and
write; a pool of actors runs the model (--ray-actors of them, else an autoscaling pool of 1 up to one
per GPU, one GPU each with --device cuda); this process commits each unit's manifest part as above, so a
job started with one executor may be finished with the other. Its own failures are one line each: a
cluster that does not answer at the address exits 1 (naming it); --device cuda on a cluster without GPUs
and Ray not installed (pip install 'cut-pipeline[ray]') exit 2; actors that keep dying (past Ray's
restarts), or tasks that fail past Ray's retries, exit 1 naming the units left uncommitted (a rerun
finishes them).
A bad input image is never an exit: it becomes its manifest row. SIGTERM (or
Ctrl-C) stops taking batches, commits the units that are complete and exits 143 (130).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch

from cut import CheckpointError
from jobs.cli import HelpFormatter, add_logging_arguments, add_options, given, run_job
from jobs.config import ConfigError, build
from jobs.infer_config import InferConfig, wants_cuda
from jobs.logs import setup_logging
from jobs.ray_executor import RayExecutorError, RayPipeline
from jobs.runtime import available_cores, env_int, reuse_freed_memory
from jobs.signals import StopSignals
from jobs.translator import Translator, finish
from pipeline.ingest import ListingError
from pipeline.manifest import committed_units, manifest_dir
from pipeline.plan import PlanError, worker_units
from pipeline.planner import obtain_plan
from pipeline.shards import ShardIndexError
from pipeline.tables import TableError, TableOptions

log = logging.getLogger("jobs.infer")

DEFAULT_SIZE = 256


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.infer", description=__doc__, formatter_class=HelpFormatter
    )
    add_options(p, InferConfig)
    add_logging_arguments(p)
    return p


def load_infer_config(args: argparse.Namespace) -> InferConfig:
    """The validated config of a parsed command line (ConfigError if a value is out of range)."""
    config = build(InferConfig, given(args, "log_format"), "command line")
    if config.worker_index is None:
        config.worker_index = env_int("RANK", "JOB_COMPLETION_INDEX", default=0)
    if config.num_workers is None:
        config.num_workers = env_int("WORLD_SIZE", "JOB_COMPLETIONS", default=1)
    if config.batch_size is None:
        config.batch_size = 16 if wants_cuda(config) else 1
    cores = available_cores()
    if config.workers is None:
        config.workers = max(1, cores // 3) if wants_cuda(config) else 0
    if config.encode_threads is None:
        config.encode_threads = max(1, cores // 2) if wants_cuda(config) else 1
    onnx = config.engine == "onnxruntime"
    if config.bf16 is None:
        config.bf16 = wants_cuda(config) and not onnx
    if config.channels_last is None:
        config.channels_last = wants_cuda(config) and not onnx
    checks = [
        ("--engine onnxruntime", not onnx or not (config.bf16 or config.channels_last or config.compile),
         "used without --bf16, --channels-last and --compile (torch engine options)"),
        ("--batch-size", config.batch_size >= 1, ">= 1"),
        ("--workers", config.workers >= 0, ">= 0"),
        ("--encode-threads", config.encode_threads >= 1, ">= 1"),
        ("--png-level", 0 <= config.png_level <= 9, "within 0..9"),
        ("--unit-size", config.unit_size >= 1, ">= 1"),
        (
            "--crop-size",
            config.crop_size is None or (config.crop_size >= 8 and config.crop_size % 4 == 0),
            "a multiple of 4, at least 8",
        ),
        ("--load-size", config.load_size is None or config.load_size >= 8, ">= 8"),
        ("--quality", 1 <= config.quality <= 100, "within 1..100"),
        ("--num-workers", config.num_workers >= 1, ">= 1"),
        ("--worker-index", 0 <= config.worker_index < config.num_workers, "within 0..num-workers-1"),
        ("--plan-timeout", config.plan_timeout > 0, "> 0"),
        ("--keep-columns", config.keep_columns is None or all(keep_columns(config)), "column names, "
         "comma-separated"),
        ("--table-version", config.table_version is None or config.table_version >= 0, ">= 0"),
        ("--ray-actors", config.ray_actors is None or config.ray_actors >= 1, ">= 1"),
        ("--tile-size", config.tile_size is None or config.tile_size == 0
         or (config.tile_size >= 16 and config.tile_size % 4 == 0), "0, or a multiple of 4 of at least 16"),
    ]
    for flag, ok, expected in checks:
        if not ok:
            raise ConfigError(f"{flag} must be {expected}")
    return config


def keep_columns(config: InferConfig) -> tuple[str, ...]:
    return tuple(c.strip() for c in (config.keep_columns or "").split(",")) if config.keep_columns else ()


def table_options(config: InferConfig) -> TableOptions:
    return TableOptions(config.image_column, config.key_column, keep_columns(config), config.table_version)


# ------------------------------------------------------------------------------------------------ run
def apply_model_card(config: InferConfig, card: dict[str, Any]) -> None:
    """Sizes not given on the command line come from the model card: the size it was trained at. Says
    what size the outputs will have, and how to keep the inputs' (before the first image)."""
    trained = int(card.get("crop_size", DEFAULT_SIZE))
    crop_from = "--crop-size"
    if config.crop_size is None:
        config.crop_size = trained
        crop_from = ("the crop size the model was trained at" if "crop_size" in card
                     else "the default: the checkpoint names no crop size")
    if config.load_size is None:
        config.load_size = trained
    log.info("%s", size_rule(config, crop_from))
    if card.get("preset") == "SinCUT" and config.preprocess == "official":
        log.warning("a SinCUT model translates its source at full resolution (the official test): pass "
                    "--preprocess none; --preprocess official squashes it to %dx%d", trained, trained)
    if card and config.preprocess == "official" and config.crop_size != trained:
        log.warning(
            "the model was trained on %dx%d crops; translating at --crop-size %d",
            trained,
            trained,
            config.crop_size,
        )


def size_rule(config: InferConfig, crop_from: str) -> str:
    """What size --preprocess gives the outputs, in words, with how to keep the inputs' size."""
    keep = "; --preprocess none keeps each input's size"
    if config.preprocess == "official":
        return (f"every output is {config.crop_size}x{config.crop_size} (--preprocess official, as the "
                f"official test.py; {crop_from}){keep}")
    if config.preprocess == "shortside":
        return f"each output's shorter side is {config.load_size} (--preprocess shortside, --load-size){keep}"
    return "each output has its input's size (--preprocess none)"


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
    if config.engine != "torch":
        identity["engine"] = config.engine
    if config.tile_size is not None:  # as given: workers on other devices may derive other defaults
        identity["tile_size"] = config.tile_size
    if config.image_format in ("jpg", "webp"):
        identity["quality"] = config.quality
    elif config.image_format == "png":
        identity["png_level"] = config.png_level
    if config.preprocess == "official":
        identity["crop_size"] = config.crop_size
    if config.preprocess == "shortside":
        identity["load_size"] = config.load_size
    for name in ("image_column", "key_column", "table_version"):  # table options, as given
        if getattr(config, name) is not None:
            identity[name] = getattr(config, name)
    if config.keep_columns is not None:
        identity["keep_columns"] = list(keep_columns(config))
    return identity


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_infer_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    setup_logging(config.worker_index, args.log_format)
    reuse_freed_memory()  # activations are allocated anew per batch: no page faults for them each time
    stop = StopSignals()
    with stop.installed():
        return _run(config, stop)


def _run(config: InferConfig, stop: StopSignals) -> int:
    ray = config.executor == "ray"
    try:
        # On Ray this process only plans and commits: the model runs in the actors, so it is loaded here
        # on the CPU, for the job's model id, card and input geometry.
        translator = Translator(config, stop, torch.device("cpu") if ray else None)
        apply_model_card(config, translator.card)
    except (CheckpointError, ConfigError) as exc:
        log.error("%s", exc)  # a checkpoint that fails its checks, a flag it does not take: exit 2
        return 2
    except OSError as exc:  # a checkpoint not (yet) there or unreadable: a rerun may find it
        log.error("%s", exc)
        return 1
    if not ray:
        return _translate(config, stop, translator, None)
    try:
        pipeline = RayPipeline(config, stop)
    except RayExecutorError as exc:
        log.error("%s", exc)
        return exc.code
    try:
        return _translate(config, stop, translator, pipeline)
    finally:
        pipeline.close()


def _translate(config: InferConfig, stop: StopSignals, translator: Translator, pipeline: RayPipeline | None
               ) -> int:
    """Plan (or read the plan), run this worker's uncommitted units with the executor, finish."""
    try:
        plan = obtain_plan(
            config.out,
            config.inputs,
            job_identity(config, translator.model_sha256),
            config.unit_size,
            worker=config.worker_index,
            check_inputs=config.check_inputs,
            add_new_inputs=config.add_new_inputs,
            timeout=config.plan_timeout,
            tables=table_options(config),
        )
    except (PlanError, ShardIndexError, ListingError, TableError, FileNotFoundError) as exc:
        log.error("%s", exc)  # the same arguments would fail the same way: exit 2, nothing written
        return 2
    except OSError as exc:  # storage trouble after retries: a rerun may succeed
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
    stop.graceful = True  # from here a first signal lets the complete units commit
    if pipeline is None:
        translator.run(mine)
    else:
        pipeline.run(translator, mine, stop)
    stop.graceful = False
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
    if pipeline is not None and pipeline.lost:
        log.error("%s", pipeline.lost)
        return 1
    if translator.unfinished:
        log.warning("stopped with units %s uncommitted; rerun to finish them", translator.unfinished)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    run_job(main)
