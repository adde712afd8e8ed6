"""``model.init_from``: a new run that starts from a trained generator (fine-tuning).

Only G's weights are taken; D, F, the optimizers, the step and the schedule start fresh. The source
is anything ``cut.generator_from_checkpoint`` reads (our export, a training state, an official
``latest_net_G.pth``), or a run folder, resolved as ``jobs.infer --checkpoint`` resolves it. The
checks are ``cut.checkpoint.load_generator_weights``'s; this module reads the bytes and names the keys.
"""

from __future__ import annotations

import hashlib
from typing import Any

from torch import nn

from cut import CheckpointError, read_checkpoint
from cut.checkpoint import load_generator_weights
from pipeline import storage
from pipeline.checkpoints import resolve_generator_url

# The generator's architecture fields and the config keys that set them.
CONFIG_KEYS = {
    "input_nc": "model.input_nc",
    "output_nc": "model.output_nc",
    "ngf": "model.ngf",
    "n_blocks": "model.n_blocks",
    "antialias": "model.antialias",
    "antialias_up": "model.antialias_up",
    "norm": "model.normG",
    "use_dropout": "model.no_dropout (inverted)",
    "num_downs": "model.netG (a U-Net)",
}


class InitFromError(CheckpointError):
    """``model.init_from`` names a generator this run cannot start from: bad input (jobs.train exits 2)."""


def init_generator(netG: nn.Module, url: str) -> dict[str, Any]:
    """Load the generator weights at ``url`` into ``netG`` in place; returns what the model card
    records. Any fault is an InitFromError."""
    source = resolve_generator_url(url)
    data = storage.read_bytes(source)
    try:
        card = load_generator_weights(netG, read_checkpoint(data, source), source, CONFIG_KEYS)
    except CheckpointError as exc:
        raise InitFromError(f"model.init_from: {exc}") from exc
    record: dict[str, Any] = {"url": url, "file": source, "sha256": hashlib.sha256(data).hexdigest()}
    for name in ("preset", "step", "direction"):
        if name in card:
            record[f"source_{name}"] = card[name]
    return record
