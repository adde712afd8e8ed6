"""The options of one jobs.infer worker: each field is a flag of ``python -m jobs.infer`` (its default
and help are written here only), read by jobs.infer (which fills in the defaults chosen at run time)
and by jobs.translator (which runs the units)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from jobs.cli import option

FORMATS = ("files", "shards", "table", "delta")
IMAGE_FORMATS = ("png", "jpg", "webp", "npy")
PREPROCESS = ("official", "none", "shortside")
ENGINES = ("torch", "onnxruntime")
EXECUTORS = ("local", "ray")


@dataclass
class InferConfig:
    """A None default is chosen at run time, from the device, the machine or the model card."""

    checkpoint: str = option("", "our export (export/generator.pt), latest_net_G.pth, a training state.pt, "
                             "or a run folder (its newest checkpoint)", required=True)
    inputs: list[str] = option(  # noqa: RUF009 (option copies a list default per instance)
        [], "shard sets or listings", "--input", required=True, metavar="URL")
    out: str = option("", "output URL (images/, manifest/, _SUCCESS)", required=True)
    format: str = option("files", "write image files, shards, or a table: table (OUT/table/ Parquet parts, "
                         "the images in the `datasets` Image layout beside the manifest columns) or delta "
                         "(OUT/table/ a Delta table, one transaction per unit)", choices=FORMATS)
    image_format: str = option("png", "png (lossless, fast: pipeline/png.py), jpg or webp (lossy, "
                               "--quality), npy (NumPy arrays: any channel count; models with more than 4 "
                               "output channels need it)", choices=IMAGE_FORMATS)
    quality: int = option(95, "JPEG/WebP quality, 1-100 (default: 95); PNG is lossless")
    png_level: int = option(1, "PNG deflate level 0-9 (default: 1, ISA-L: 0.7 ms for 256x256, files the "
                            "size of Pillow's level 1; 2-9: zlib, a few percent smaller, several times "
                            "slower)")
    preprocess: str = option("official", "official: resize to the crop size as test.py; none: keep the size "
                             "(network at a multiple of 4, output restored to the input size); shortside: "
                             "shortest side to --load-size", choices=PREPROCESS)
    load_size: int | None = option(None, "shortest side for --preprocess shortside (default: the model "
                                   "card's crop size, else 256)")
    crop_size: int | None = option(None, "network size for --preprocess official (default: the model card's "
                                   "crop size, else 256)")
    max_pixels: int = option(64 * 2**20, "inputs with more pixels become error rows")
    batch_size: int | None = option(None, "default: 16 on CUDA, 1 on CPU (cache-bound)")
    workers: int | None = option(None, "DataLoader processes that read and decode (default: a third of the "
                                 "usable cores on CUDA; 0 on CPU, where the model's threads use every core: "
                                 "inputs decode in this process between batches, without a forked "
                                 "process's start-up and copy-on-write faults)")
    encode_threads: int | None = option(None, "threads that encode, hash and write outputs (default: half "
                                        "the usable cores on CUDA, 1 on CPU)")
    unit_size: int = option(1000, "images (or shard samples) per work unit, at planning")
    worker_index: int | None = option(None, "this worker (default: RANK or JOB_COMPLETION_INDEX)")
    num_workers: int | None = option(None, "all workers (default: WORLD_SIZE or JOB_COMPLETIONS)")
    device: str = option("auto", "auto: CUDA if there is one", choices=("auto", "cpu", "cuda"))
    bf16: bool | None = option(None, "default: on for CUDA")
    channels_last: bool | None = option(None, "default: on for CUDA")
    compile: bool = option(False, "torch.compile the generator (CUDA)")
    tile_size: int | None = option(None, "inputs larger than this many network pixels on a side are "
                                   "translated tile by tile, exactly (whole-image InstanceNorm statistics); "
                                   "0 never tiles (default: from the device's memory)")
    engine: str = option("torch", "torch, or onnxruntime: run an ONNX export of jobs.export (--checkpoint: "
                         "its generator.onnx or its folder) on onnxruntime's CPU execution provider (CUDA's "
                         "with --device cuda)", choices=ENGINES)
    progress: bool = option(
        True, "hide the progress bar (drawn only when stderr is a terminal)", "--no-progress")
    plan_timeout: float = option(3600.0, "seconds a worker waits for the plan another worker is making "
                                 "(default: 3600)")
    image_column: str | None = option(None, "a table input's image column: binary, or the datasets Image "
                                      "struct (default: the one column of either type)")
    key_column: str | None = option(None, "a table input's key column, strings or integers (default: the "
                                    "Image struct's path, else the row's part file and position)")
    keep_columns: str | None = option(None, "a table input's columns (partition columns too) to carry to the "
                                      "outputs, comma-separated", metavar="A,B,...")
    table_version: int | None = option(None, "the version of a Delta table input to read (default: its "
                                       "current snapshot)")
    add_new_inputs: bool = option(False, "rerun: add inputs that appeared since the plan was made as new "
                                  "units")
    check_inputs: bool = option(True, "rerun: do not relist the inputs (worker 0 relists them by default to "
                                "find changes)", "--skip-input-check")
    executor: str = option("local", "local: this process (and torchrun ranks or Indexed Job indexes); ray: "
                           "a Ray pipeline on a Ray cluster (CPU tasks read, decode, encode and write; an "
                           "actor pool runs the model); the same plan, outputs and manifest either way",
                           choices=EXECUTORS)
    ray_address: str = option("", "--executor ray: the cluster to join (host:port, ray://host:10001, "
                              "auto; default: RAY_ADDRESS, else a local Ray instance this job starts and "
                              "stops)")
    ray_actors: int | None = option(None, "--executor ray: translation actors (default: an autoscaling pool "
                                    "of 1 up to one per GPU of the cluster with --device cuda, else up to 1 "
                                    "or 2 CPU actors)")


def wants_cuda(config: InferConfig) -> bool:
    """Whether this worker runs on CUDA: --device cuda, or auto on a machine that has it."""
    return torch.cuda.is_available() if config.device == "auto" else config.device == "cuda"
