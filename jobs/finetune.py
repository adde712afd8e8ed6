"""``model.init_from``: a new run that starts from a trained generator (fine-tuning).

Only G's weights are taken; D, F, the optimizers, the step and the schedule start fresh. The source
is anything ``cut.generator_from_checkpoint`` reads (our export, a training state, an official
``latest_net_G.pth``), or a run folder, resolved as ``jobs.infer --checkpoint`` resolves it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from torch import nn

from cut import CheckpointError, generator_from_checkpoint, model_card, read_checkpoint
from cut.checkpoint import load_strict
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


def architecture_mismatch(config: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> list[str]:
    """One line per architecture field where the configured generator and the checkpoint's differ."""
    lines = []
    for field in sorted(set(config) | set(checkpoint)):
        ours, theirs = config.get(field, "absent"), checkpoint.get(field, "absent")
        if ours != theirs:
            lines.append(f"{field}: checkpoint {theirs!r}, config {ours!r} ({CONFIG_KEYS.get(field, field)})")
    return lines


class InitFromError(CheckpointError):
    """``model.init_from`` names a generator this run cannot start from: bad input (jobs.train exits 2)."""


def init_generator(netG: nn.Module, url: str) -> dict[str, Any]:
    """Load the generator weights at ``url`` into ``netG`` in place; returns what the model card records.

    The source is checked as every job checks a checkpoint (``cut.generator_from_checkpoint``: what it
    declares against its tensors, finite weights, a sane card). The generators fit when their tensors
    have the same names and shapes (``load_strict``): a state dict without an architecture record (a
    training state, an official file) fixes only what its shapes show, and a StyleGAN2 generator's
    widths do not tell (ngf, resolution) apart, so its inferred architecture may differ from the
    configured one in fields that change nothing. Any fault is an InitFromError; one that does not fit
    names the differing tensors and every differing architecture field with the config key that sets it.
    """
    source = resolve_generator_url(url)
    data = storage.read_bytes(source)
    try:
        obj = read_checkpoint(data, source)
        card = model_card(obj, source)
        _load(netG, generator_from_checkpoint(obj, source), source)
    except CheckpointError as exc:
        raise InitFromError(f"model.init_from: {exc}") from exc
    record: dict[str, Any] = {"url": url, "file": source, "sha256": hashlib.sha256(data).hexdigest()}
    for name in ("preset", "step", "direction"):
        if name in card:
            record[f"source_{name}"] = card[name]
    return record


def _load(netG: nn.Module, loaded: nn.Module, source: str) -> None:
    """``loaded``'s weights into ``netG``; a misfit also names the differing architecture fields."""
    try:
        load_strict(netG, loaded.state_dict(), source)
    except CheckpointError as exc:
        fields = architecture_mismatch(netG.architecture, loaded.architecture)
        if not fields:
            raise
        raise CheckpointError(f"{exc}; the configured generator differs in {'; '.join(fields)}") from None
