"""Export a generator for deployment: ONNX or TorchScript, dynamic batch, height and width, verified.

    python -m jobs.export --checkpoint s3://b/runs/h2z --out s3://b/models/h2z --format onnx
    python -m jobs.export --checkpoint latest_net_G.pth --out models/h2z --format torchscript

--checkpoint takes every generator this project writes or reads: export/generator.pt, an official
latest_net_G.pth, a training state.pt (also checkpoints/best/state.pt) or a run folder (its newest
checkpoint). Before anything is written, the exported model is run by its own runtime (onnxruntime
for ONNX, torch.jit for TorchScript) on random inputs of several shapes and compared with the
generator in PyTorch; a relative difference above 1e-4 fails the job (exit 1) and writes nothing.
A checkpoint that is not what it declares (an architecture or model card its tensors do not fit, sizes
out of bounds, tensors that are not finite floating weights) exits 2 naming the file and the fault,
before anything of the declared size is built, and writes nothing.
A SinCUT generator exports only without decoder noise (model.netG smallstylegan2); the noisy
stylegan2 one is refused with exit 1 (docs/inference.md, SinCUT).

Writes OUT/generator.onnx or OUT/generator.torchscript.pt (the model card inside: ONNX metadata
key cut_model_card, TorchScript extra file cut_model_card.json), OUT/model_card.json and
OUT/export.json (format, opset, input and output names, the verified shapes and their errors).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from cut import CheckpointError, generator_from_checkpoint, read_checkpoint
from cut.checkpoint import model_card
from cut.export import (
    FORMATS,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    SUFFIX,
    TOLERANCE,
    ExportError,
    export_bytes,
    verify,
)
from jobs.cli import HelpFormatter, add_logging_arguments, add_options, given, option, run_job
from jobs.logs import setup_logging
from pipeline import storage
from pipeline.checkpoints import resolve_generator_url

log = logging.getLogger("jobs.export")


@dataclass
class ExportConfig:
    """One export: each field a flag of the command line (its default and help written here only)."""

    checkpoint: str = option("", "generator: export, latest_net_G.pth, state.pt or a run folder",
                             required=True)
    out: str = option("", "folder URL for the exported model and its model card", required=True)
    format: str = option("", "onnx or torchscript", choices=FORMATS, required=True)
    size: int = option(0, "side of the example input that is traced (default: the model card's crop size, "
                       "else 256); the export runs at any size")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__,
                                formatter_class=HelpFormatter)
    add_options(p, ExportConfig)
    add_logging_arguments(p)
    return p


def check_shapes(size: int, multiple: int = 4) -> list[tuple[int, int, int]]:
    """(batch, height, width) the export is verified at: the traced size, and a smaller non-square
    batch of two (sides multiples of ``multiple``, as the generator needs: 4 for a ResNet, 128 or 256
    for a U-Net), or a larger one where no smaller size fits."""
    low = max(16, multiple)
    small = max(low, size // 2 // multiple * multiple)
    other = max(low, (size * 3 // 4) // multiple * multiple)
    if (small, other) == (size, size):
        other = size + multiple
    return [(1, size, size), (2, small, other)]


def export(checkpoint: str, out: str, fmt: str, size: int = 0) -> dict[str, Any]:
    url = resolve_generator_url(checkpoint)
    obj = read_checkpoint(storage.read_bytes(url), url)
    netG = generator_from_checkpoint(obj, url)
    if getattr(netG, "inject_noise", False):
        raise ExportError(
            f"{url}: this SinCUT generator (netG stylegan2) adds seeded random noise in its decoder, which "
            "neither ONNX nor TorchScript can reproduce (their runtimes draw their own numbers), so an "
            "export would not compute what jobs.infer computes; translate it with jobs.infer (PyTorch), "
            "or train model.netG=smallstylegan2 (no noise), which exports"
        )
    card = {"architecture": dict(netG.architecture), **model_card(obj, url), "source_checkpoint": url}
    size = size or int(card.get("crop_size", 256))
    multiple = netG.size_multiple
    if size < max(16, multiple) or size % multiple:
        raise ExportError(f"--size must be a multiple of {multiple} and at least {max(16, multiple)} for "
                          f"this generator, got {size}")
    log.info("exporting %s as %s (traced at %dx%d)", url, fmt, size, size)
    data = export_bytes(netG, fmt, (size, size), card)
    checks = verify(netG, data, fmt, check_shapes(size, multiple))
    name = f"generator{SUFFIX[fmt]}"
    report = {"format": fmt, "file": name, "opset": OPSET if fmt == "onnx" else None, "input": INPUT_NAME,
              "output": OUTPUT_NAME, "layout": "NCHW float32 in [-1, 1], H and W multiples of 4",
              "dynamic_axes": ["batch", "height", "width"], "tolerance": TOLERANCE, "checks": checks,
              "torch": torch.__version__, "source_checkpoint": url}
    storage.write_bytes_atomic(storage.join(out, name), data)
    storage.write_bytes_atomic(storage.join(out, "model_card.json"), json.dumps(card, indent=1).encode())
    storage.write_bytes_atomic(storage.join(out, "export.json"), json.dumps(report, indent=1).encode())
    for check in checks:
        log.info("verified at %s: relative error %.2g", _shape(check), check["relative_error"])
    return report


def _shape(check: dict[str, Any]) -> str:
    return "x".join(map(str, check["shape"]))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = ExportConfig(**given(args, "log_format"))
    setup_logging(0, args.log_format)
    try:
        report = export(config.checkpoint, config.out, config.format, config.size)
    except ModuleNotFoundError as exc:
        log.error("%s: the export needs onnx and onnxruntime (pip install 'cut-pipeline[export]')", exc)
        return 1
    except CheckpointError as exc:
        log.error("%s", exc)
        return 2
    except (ExportError, FileNotFoundError, IsADirectoryError) as exc:
        log.error("%s", exc)
        return 1
    print(f"{storage.join(config.out, report['file'])}: verified against torch at "
          + ", ".join(f"{_shape(c)} ({c['relative_error']:.1e})" for c in report["checks"]))
    return 0


if __name__ == "__main__":
    run_job(main)
