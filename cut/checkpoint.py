"""Checkpoint layouts: official ``latest_net_{G,D,F}.pth`` state dicts and our generator export.

Works on bytes and state dicts only; reading and writing files is the jobs' business. Everything is
loaded with ``torch.load(weights_only=True)``, so no pickled code ever runs.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cut.networks import ResnetGenerator
from cut.stylegan2 import INFERENCE_NOISE_SEED, RESOLUTIONS, StyleGAN2Generator, generator_channels
from cut.unet import UnetGenerator, infer_unet_architecture

Generator = ResnetGenerator | UnetGenerator | StyleGAN2Generator
STYLEGAN2_FIRST_KEY = "encoder.convs.1.0.weight"  # the official SinCUT generator's first convolution

EXPORT_FORMAT = "cut-pipeline/generator"
EXPORT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network it is loaded into."""


def read_checkpoint(data: bytes, source: str = "checkpoint") -> Any:
    """Deserialize checkpoint bytes safely; ``source`` names the file in error messages."""
    if not data:
        raise CheckpointError(f"{source}: the file is empty")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(
            f"{source}: not a readable torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc


def to_bytes(obj: Any) -> bytes:
    """Serialize a state dict or export with ``torch.save``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DataParallel/DDP (and the official CPU save path) add."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def load_strict(net: nn.Module, state: Mapping[str, Any], name: str) -> None:
    """``load_state_dict(strict=True)`` with an error that lists what does not match."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name}: expected a state dict, got {type(state).__name__}")
    state = strip_module_prefix(state)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
        if wrong:
            parts.append(f"shape mismatch: {wrong[:3]}")
        raise CheckpointError(f"{name}: checkpoint does not match the network: {'; '.join(parts)}")
    net.load_state_dict(state, strict=True)


def export_generator(netG: Generator, **metadata: Any) -> dict[str, Any]:
    """A generator-only export: architecture, weights and free-form metadata (plain types only)."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "architecture": dict(netG.architecture),
        "state_dict": {k: v.detach().cpu() for k, v in netG.state_dict().items()},
        "metadata": metadata,
    }


def infer_generator_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, int | bool | str]:
    """Recover the generator's arguments from an official-layout generator state dict: a U-Net's
    (``cut.unet.infer_unet_architecture``) or a ResnetGenerator's, with its norm (batch: running
    statistics; instance: a bias on the first convolution; none: neither) and dropout (it moves each
    block's second convolution from index 5 to 6, where batch norm would otherwise sit)."""
    if STYLEGAN2_FIRST_KEY in state:
        return infer_stylegan2_architecture(state)
    if "model.model.0.weight" in state:
        try:
            return infer_unet_architecture(state)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from exc
    if "model.1.weight" not in state:
        raise CheckpointError("not a ResNet generator state dict: no key 'model.1.weight' "
                              "(nor a U-Net's 'model.model.0.weight')")
    first = state["model.1.weight"]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.conv_block\.1\.weight$", k))}
    if not blocks:
        raise CheckpointError("not a ResNet generator state dict: no residual blocks found")
    antialias = "model.7.filt" in state
    first_up = max(blocks) + 1
    convs = [int(m.group(1)) for k in state if (m := re.match(r"model\.(\d+)\.weight$", k))]
    norm = "batch" if "model.2.running_mean" in state else ("instance" if "model.1.bias" in state else "none")
    return {
        "input_nc": int(first.shape[1]),
        "output_nc": int(state[f"model.{max(convs)}.weight"].shape[0]),
        "ngf": int(first.shape[0]),
        "n_blocks": len(blocks),
        "antialias": antialias,
        "antialias_up": f"model.{first_up}.filt" in state,
        "norm": norm,
        "use_dropout": any(  # a convolution (not a batch norm) at index 6
            re.match(r"model\.\d+\.conv_block\.6\.weight$", k) and v.dim() == 4 for k, v in state.items()
        ),
    }


def infer_stylegan2_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, int | bool]:
    """The ``StyleGAN2Generator`` arguments of an official SinCUT generator state dict.

    Downsampling ResBlocks are the encoder's with a blur before ``conv2``; the remaining encoder
    ResBlocks are half of ``n_blocks``. The noise is on unless there are 2 blocks (the official
    ``smallstylegan2``, the only variant without it). Widths fix the network; of the (ngf, resolution)
    pairs that give them, the official resolution 64 is preferred (any pair builds the same network).
    """
    modules = {int(m.group(1)) for k in state if (m := re.match(r"encoder\.convs\.(\d+)\.", k))}
    down = sorted(i for i in modules if f"encoder.convs.{i}.conv2.0.kernel" in state)
    decoder = [int(m.group(1)) for k in state if (m := re.match(r"decoder\.convs\.(\d+)\.0\.weight$", k))]
    if not decoder:
        raise CheckpointError("not a StyleGAN2 generator state dict: no decoder output convolution")
    n_blocks = 2 * (max(modules) - 1 - len(down))
    widths = [int(state[STYLEGAN2_FIRST_KEY].shape[0])]
    widths += [int(state[f"encoder.convs.{i}.conv2.1.weight"].shape[0]) for i in down]
    for resolution in (64, *(r for r in RESOLUTIONS if r != 64)):
        if resolution // 2 ** len(down) < RESOLUTIONS[0]:
            continue
        for ngf in range(1, 4 * widths[0] * resolution // 512 + 2):
            table = generator_channels(ngf)
            if [table[resolution // 2**k] for k in range(len(down) + 1)] == widths:
                return {
                    "input_nc": int(state[STYLEGAN2_FIRST_KEY].shape[1]),
                    "output_nc": int(state[f"decoder.convs.{max(decoder)}.0.weight"].shape[0]),
                    "ngf": ngf,
                    "n_blocks": n_blocks,
                    "num_downsampling": len(down),
                    "resolution": resolution,
                    "inject_noise": n_blocks != 2,
                }
    raise CheckpointError(f"StyleGAN2 generator widths {widths} fit no official channel table")


def build_generator(architecture: Mapping[str, Any]) -> Generator:
    """The generator an ``architecture`` dict describes: a U-Net's has ``num_downs``; exports written
    before norm and dropout were options lack those keys and get the defaults (instance, none)."""
    try:
        if "num_downs" in architecture:
            return UnetGenerator(**architecture)
        if "num_downsampling" in architecture:
            return StyleGAN2Generator(**architecture)
        return ResnetGenerator(**architecture)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"not a generator architecture {dict(architecture)}: {exc}") from exc


def model_card(obj: Any) -> dict[str, Any]:
    """The model card a checkpoint carries (our exports and training states), else {}."""
    if isinstance(obj, Mapping) and obj.get("format") == EXPORT_FORMAT:
        return dict(obj.get("metadata", {}).get("card", {}))
    if isinstance(obj, Mapping) and isinstance(obj.get("card"), Mapping):
        return dict(obj["card"])
    return {}


def generator_from_checkpoint(obj: Any, source: str = "checkpoint") -> Generator:
    """Build a generator from our export, a training state (jobs.train's ``state.pt``, or a model's
    state dict) or an official ``latest_net_G.pth`` state dict."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "G" in obj["model"]:
        obj = obj["model"]  # jobs.train's state.pt: the model's state beside the run's position
    if isinstance(obj, Mapping) and obj.get("format") == EXPORT_FORMAT:
        if obj.get("version") != EXPORT_VERSION:
            raise CheckpointError(f"{source}: export version {obj.get('version')} is not supported")
        arch, state = obj["architecture"], obj["state_dict"]
    elif isinstance(obj, Mapping) and "G" in obj and "opt_G" in obj:
        state = obj["G"]  # a full training state
        arch = infer_generator_architecture(strip_module_prefix(state))
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state = strip_module_prefix(obj)
        arch = infer_generator_architecture(state)
    else:
        raise CheckpointError(f"{source}: neither a generator export, a training state nor a generator "
                              f"state dict")
    try:
        net = build_generator(arch)
        load_strict(net, state, "G")
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    if isinstance(net, StyleGAN2Generator):
        net.noise_seed = INFERENCE_NOISE_SEED  # the decoder's noise: the same for every translation
    return net.eval().requires_grad_(False)  # frozen: translation may cache per-weight work


def official_state_dicts(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"G": ..., "D": ..., "F": ...}`` in the official layout (no prefix), on the CPU."""
    return {
        name: {k: v.detach().cpu() for k, v in net.state_dict().items()}
        for name, net in (("G", model.netG), ("D", model.netD), ("F", model.netF))
    }
