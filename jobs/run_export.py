"""A run's model card and its export: ``RUN/export/`` holds the generator of the newest checkpoint as
``generator.pt`` (for jobs.infer), as an official-layout ``latest_net_G.pth``, and ``model_card.json``,
written last, naming their step (a card of a step means both files are of it)."""

from __future__ import annotations

import json
import logging
from typing import Any

from torch import nn

from cut import export_generator
from cut.checkpoint import to_bytes
from jobs.config import TrainConfig
from jobs.runtime import code_version
from pipeline import storage
from pipeline.checkpoints import CheckpointWriteError

log = logging.getLogger("jobs.train")

EXPORT = "export"
EXPORT_CARD = "model_card.json"  # RUN/export/model_card.json: written last, names the export's step


def model_card(config: TrainConfig, netG: nn.Module, stream: Any, step: int,
               init_from: dict[str, Any] | None, scores: dict[str, float]) -> dict[str, Any]:
    """The model card every checkpoint and export carries: what the generator is and was made from."""
    c = config
    a_images, b_images = stream.a.total, stream.b.total
    if c.model.direction == "BtoA":
        a_images, b_images = b_images, a_images
    return {
        "preset": c.model.preset,
        "direction": c.model.direction,
        "input_domain": "a" if c.model.direction == "AtoB" else "b",
        "init_from": init_from,
        "architecture": dict(netG.architecture),
        "load_size": c.data.load_size,
        "crop_size": c.data.crop_size,
        "preprocess": getattr(stream, "card_preprocess",
                              f"{c.data.preprocess} (training); official test resize to crop_size"),
        "data": {
            "a": c.data.a,
            "b": c.data.b,
            "a_images": a_images,
            "b_images": b_images,
        },
        "step": step,
        "eval_scores": dict(scores),
        "code_version": code_version(),
    }


def write_export(run_url: str, netG: nn.Module, preset: str, step: int, card: dict[str, Any]) -> None:
    """The generator alone, our layout and the official one, then the model card naming their step.
    CheckpointWriteError when a write fails (the checkpoint before it stays committed)."""
    meta = {"preset": preset, "step": step, "code_version": code_version(), "card": card}
    official = {k: v.detach().cpu() for k, v in netG.state_dict().items()}
    files = {
        "generator.pt": to_bytes(export_generator(netG, **meta)),
        "latest_net_G.pth": to_bytes(official),
        EXPORT_CARD: json.dumps(meta, indent=1, default=str).encode(),
    }
    for name, data in files.items():
        url = storage.join(run_url, EXPORT, name)
        try:
            storage.write_bytes_atomic(url, data)
        except OSError as exc:
            raise CheckpointWriteError(
                f"step {step}: checkpoint committed, but writing its export {url} failed ({exc}); "
                f"export/ is older than the newest checkpoint until a rerun rewrites it"
            ) from exc
    log.info("step %d: exported the generator to %s", step, storage.join(run_url, EXPORT))


def export_step(run_url: str) -> int | None:
    """The step export/ holds by its model card; None when it has none (or cannot be read)."""
    try:
        card = storage.read_bytes(storage.join(run_url, EXPORT, EXPORT_CARD))
        return int(json.loads(card)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def card_markdown(card: dict[str, Any], nets: dict[str, nn.Module], extra: list[tuple[str, str]]) -> str:
    """The model card, the networks' sizes and ``extra`` rows, as a Markdown table (TensorBoard's text)."""
    params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
    rows = [(k, json.dumps(v) if isinstance(v, dict) else v) for k, v in card.items()]
    rows += [("parameters", ", ".join(f"{k} {v:,}" for k, v in params.items())), *extra]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
