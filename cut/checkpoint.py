"""Checkpoint layouts: official ``latest_net_{G,D,F}.pth`` state dicts and our generator export.

Works on bytes and state dicts only; reading and writing files is the jobs' business. Everything is
loaded with ``torch.load(weights_only=True)``, so no pickled code ever runs.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from cut.fast import accelerate
from cut.networks import NORM_TYPES, ResnetGenerator
from cut.stylegan2 import INFERENCE_NOISE_SEED, RESOLUTIONS, StyleGAN2Generator, generator_channels
from cut.unet import UnetGenerator, infer_unet_architecture

Generator = ResnetGenerator | UnetGenerator | StyleGAN2Generator
STYLEGAN2_FIRST_KEY = "encoder.convs.1.0.weight"  # the official SinCUT generator's first convolution

EXPORT_FORMAT = "cut-pipeline/generator"
EXPORT_VERSION = 1

# What an architecture may declare. Wider than any generator that was ever trained, and narrow enough
# that building the declared network on the meta device (to compare it with the tensors) costs nothing.
ARCHITECTURE_BOUNDS = {"input_nc": (1, 1024), "output_nc": (1, 1024), "ngf": (1, 1024), "n_blocks": (0, 256),
                       "num_downs": (5, 12), "num_downsampling": (0, 8)}
ARCHITECTURE_FLAGS = ("antialias", "antialias_up", "use_dropout", "inject_noise")
# What a model card may declare about the sizes it sizes work by (jobs.infer and jobs.export translate
# at crop_size by default): a training crop beyond 4096 px fits no accelerator.
CARD_SIZES = {"crop_size": (8, 4096), "load_size": (8, 16384)}
CARD_STRINGS = ("preset", "direction", "preprocess")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the network it is loaded into."""


ACCEPTED = ("a torch checkpoint (torch.save's zip or legacy format: a run's checkpoint or generator "
            "export, an official latest_net_G.pth)")
_ZIP, _PICKLE = b"PK\x03\x04", b"\x80"  # how torch.save's two formats begin
_SIGNATURES = {b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
               b"RIFF": "a RIFF file (WebP image?)", b"\x93NUMPY": "a NumPy array (.npy)",
               b"\x08": "an ONNX model or other protobuf"}


def _kind_of(data: bytes) -> str:
    """What ``data`` looks like, for a file that is not a checkpoint."""
    for signature, kind in _SIGNATURES.items():
        if data.startswith(signature):
            return kind
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return "binary data of an unknown kind"
    return "text"


def read_checkpoint(data: bytes, source: str = "checkpoint") -> Any:
    """Deserialize checkpoint bytes safely (weights and plain values only: no pickled code runs);
    ``source`` names the file in error messages, which say what the file is when it is not one."""
    if not data:
        raise CheckpointError(f"{source}: the file is empty")
    if not data.startswith((_ZIP, _PICKLE)):
        raise CheckpointError(
            f"{source}: not a readable torch checkpoint: it looks like {_kind_of(data)}; accepted: {ACCEPTED}"
        )
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's advice to load with weights_only=False is unsafe here
        raise CheckpointError(
            f"{source}: not a readable torch checkpoint: it holds objects other than weights and plain "
            f"values, which are never loaded (no pickled code runs); accepted: {ACCEPTED}"
        ) from exc
    except Exception as exc:  # torch raises many types for corrupt or truncated files
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


def tensor_state(state: Any, name: str) -> dict[str, torch.Tensor]:
    """``state`` (its ``module.`` prefix dropped) when it is a state dict of dense CPU tensors, each
    backed by its own data: a broadcast view (stride 0) saved in a few bytes declares a size it does not
    hold, and would allocate it when copied."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{name}: expected a state dict, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{name}: a state dict holds tensors by name, but {key!r} is a "
                                  f"{type(value).__name__}")
        if value.layout != torch.strided or value.device.type != "cpu":
            raise CheckpointError(f"{name}: {key} is a {value.layout} tensor on {value.device}, not a dense "
                                  f"tensor of weights")
        held = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
        if value.numel() * value.element_size() > held:
            raise CheckpointError(f"{name}: {key} declares shape {tuple(value.shape)} but holds {held} bytes "
                                  f"of data (a broadcast view, not weights)")
    return strip_module_prefix(state)


def state_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> list[str]:
    """What differs between a network's tensors (``own``, real or on the meta device) and ``state``:
    names, shapes, and dtypes where one is floating and the other is not."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shared = [k for k in own if k in state]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in shared
             if state[k].shape != own[k].shape]
    dtypes = [f"{k} {state[k].dtype} != {own[k].dtype}" for k in shared
              if state[k].dtype.is_floating_point != own[k].dtype.is_floating_point]
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} keys (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[:3]})")
    if wrong:
        parts.append(f"shape mismatch: {wrong[:3]}")
    if dtypes:
        parts.append(f"dtype mismatch: {dtypes[:3]}")
    return parts


def _finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite. A finite sum proves it (NaN and Inf survive a sum) at
    a fifth of an element-wise check's cost; only a sum that is not (a NaN, an Inf, or finite values
    overflowing it) is checked element by element."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(state: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse NaN or Inf in any floating tensor: such weights translate every input into garbage."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not _finite(v)]
    if bad:
        raise CheckpointError(f"{name}: {len(bad)} of {len(state)} tensors hold NaN or Inf (e.g. {bad[:3]})")


def load_strict(net: nn.Module, state: Mapping[str, Any], name: str) -> None:
    """``load_state_dict(strict=True)`` after checking every tensor: what does not match is listed,
    non-tensors, broadcast views and NaN/Inf are refused."""
    state = tensor_state(state, name)
    parts = state_mismatch(net.state_dict(), state)
    if parts:
        raise CheckpointError(f"{name}: checkpoint does not match the network: {'; '.join(parts)}")
    check_finite(state, name)
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
        most = min(4 * widths[0] * resolution // 512 + 1, ARCHITECTURE_BOUNDS["ngf"][1])  # a bounded search
        for ngf in range(1, most + 1):
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


def check_architecture(arch: Any, name: str) -> dict[str, Any]:
    """``arch`` when every field it declares is a generator argument of the right type within
    ARCHITECTURE_BOUNDS; else a CheckpointError naming the field and its value."""
    if not isinstance(arch, Mapping):
        raise CheckpointError(f"{name} is a {type(arch).__name__}, not a dict")
    for key, value in arch.items():
        if key in ARCHITECTURE_BOUNDS:
            low, high = ARCHITECTURE_BOUNDS[key]
            ok, expected = type(value) is int and low <= value <= high, f"an integer in {low}..{high}"
        elif key in ARCHITECTURE_FLAGS:
            ok, expected = isinstance(value, bool), "true or false"
        elif key == "norm":
            ok, expected = isinstance(value, str) and value in NORM_TYPES, " or ".join(NORM_TYPES)
        elif key == "resolution":
            ok, expected = type(value) is int and value in RESOLUTIONS, f"one of {RESOLUTIONS}"
        else:
            raise CheckpointError(f"{name} has {key!r}, which no generator takes")
        if not ok:
            raise CheckpointError(f"{name} has {key}={value!r}; expected {expected}")
    return dict(arch)


def check_fit(arch: Any, state: Mapping[str, torch.Tensor], name: str) -> None:
    """Refuse an architecture whose network would not hold exactly ``state``'s tensors. The network is
    built on the meta device (shapes, no memory), so a declared size is compared with the tensors
    before anything of that size is allocated."""
    arch = check_architecture(arch, name)
    with torch.device("meta"):
        declared = build_generator(arch).state_dict()
    parts = state_mismatch(declared, state)
    if parts:
        fields = ", ".join(f"{k}={v}" for k, v in arch.items())
        raise CheckpointError(f"{name} ({fields}) does not match the tensors (shapes: tensor != declared): "
                              f"{'; '.join(parts)}")


def check_card(card: Any, source: str) -> dict[str, Any]:
    """``card`` when it is a dict whose sizes (CARD_SIZES; crop_size also a multiple of 4), names
    (CARD_STRINGS) and architecture are sane; else a CheckpointError naming ``source`` and the field."""
    if not isinstance(card, Mapping):
        raise CheckpointError(f"{source}: the model card is a {type(card).__name__}, not a dict")
    for key, (low, high) in CARD_SIZES.items():
        value = card.get(key)
        if key in card and not (type(value) is int and low <= value <= high and (key != "crop_size"
                                                                                  or value % 4 == 0)):
            multiple = ", a multiple of 4" if key == "crop_size" else ""
            raise CheckpointError(f"{source}: the model card declares {key}={value!r}; expected an integer "
                                  f"in {low}..{high}{multiple}")
    for key in CARD_STRINGS:
        if key in card and not isinstance(card[key], str):
            raise CheckpointError(f"{source}: the model card declares {key}={card[key]!r}; expected a string")
    if "architecture" in card:
        check_architecture(card["architecture"], f"{source}: the model card's architecture")
    return dict(card)


def model_card(obj: Any, source: str = "checkpoint") -> dict[str, Any]:
    """The model card a checkpoint carries (our exports and training states), else {}; checked by
    ``check_card``."""
    if isinstance(obj, Mapping) and obj.get("format") == EXPORT_FORMAT:
        metadata = obj.get("metadata", {})
        if not isinstance(metadata, Mapping):
            raise CheckpointError(f"{source}: the export's metadata is a {type(metadata).__name__}, "
                                  f"not a dict")
        return check_card(metadata.get("card", {}), source)
    if isinstance(obj, Mapping) and "card" in obj:
        return check_card(obj["card"], source)
    return {}


def _declared_weights(obj: Any, source: str) -> tuple[Mapping[str, Any] | None, Any]:
    """(architecture or None where the tensors must tell it, state dict) of a generator checkpoint."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping) and "G" in obj["model"]:
        obj = obj["model"]  # jobs.train's state.pt: the model's state beside the run's position
    if isinstance(obj, Mapping) and obj.get("format") == EXPORT_FORMAT:
        if obj.get("version") != EXPORT_VERSION:
            raise CheckpointError(f"{source}: export version {obj.get('version')} is not supported")
        return obj.get("architecture"), obj.get("state_dict")
    if isinstance(obj, Mapping) and "G" in obj and "opt_G" in obj:
        return None, obj["G"]  # a full training state
    if isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values()):
        return None, obj  # a state dict (tensor_state names any value that is not a tensor)
    raise CheckpointError(f"{source}: neither a generator export, a training state nor a generator "
                          f"state dict")


def generator_from_checkpoint(obj: Any, source: str = "checkpoint") -> Generator:
    """Build a generator from our export, a training state (jobs.train's ``state.pt``, or a model's
    state dict) or an official ``latest_net_G.pth`` state dict.

    Nothing the checkpoint declares is trusted before it is compared with the tensors it holds: the
    architecture (declared, or inferred from the tensors) and the model card's are built on the meta
    device and must have exactly the tensors' names and shapes; the tensors must be dense, backed by
    their data and finite. Only then is the generator built and loaded.
    """
    card = model_card(obj, source)
    arch, state = _declared_weights(obj, source)
    try:
        state = tensor_state(state, "G")
        if arch is None:
            arch = _inferred_architecture(state)
            check_fit(arch, state, "G: the architecture inferred from its tensors")
        else:
            check_fit(arch, state, "G: the declared architecture")
        if "architecture" in card:
            check_fit(card["architecture"], state, "G: the model card's architecture")
        check_finite(state, "G")
        net = accelerate(build_generator(arch))  # fast layer forms: same parameters and keys
        net.load_state_dict(state, strict=True)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    if isinstance(net, StyleGAN2Generator):
        net.noise_seed = INFERENCE_NOISE_SEED  # the decoder's noise: the same for every translation
    return net.eval().requires_grad_(False)  # frozen: translation may cache per-weight work


def _inferred_architecture(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``infer_generator_architecture``, with tensors of unexpected rank a CheckpointError too."""
    try:
        return infer_generator_architecture(state)
    except (IndexError, KeyError) as exc:
        raise CheckpointError(f"not a generator state dict: a tensor of unexpected shape ({exc!r})") from exc


def official_state_dicts(model: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"G": ..., "D": ..., "F": ...}`` in the official layout (no prefix), on the CPU."""
    return {
        name: {k: v.detach().cpu() for k, v in net.state_dict().items()}
        for name, net in (("G", model.netG), ("D", model.netD), ("F", model.netF))
    }


def architecture_mismatch(ours: Mapping[str, Any], theirs: Mapping[str, Any],
                          names: Mapping[str, str] | None = None) -> list[str]:
    """One line per architecture field where the configured generator (``ours``) and a checkpoint's
    (``theirs``) differ; ``names`` says which setting sets each field."""
    names = names or {}
    lines = []
    for field in sorted(set(ours) | set(theirs)):
        mine, other = ours.get(field, "absent"), theirs.get(field, "absent")
        if mine != other:
            lines.append(f"{field}: checkpoint {other!r}, config {mine!r} ({names.get(field, field)})")
    return lines


def load_generator_weights(netG: nn.Module, obj: Any, source: str,
                           names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Load the generator a checkpoint object holds into ``netG`` in place; returns its model card.

    The checkpoint is checked as every loader checks one (``generator_from_checkpoint``: what it
    declares against its tensors, finite weights, a sane card). The generators fit when their tensors
    have the same names and shapes (``load_strict``): a state dict without an architecture record (a
    training state, an official file) fixes only what its shapes show, and a StyleGAN2 generator's
    widths do not tell (ngf, resolution) apart, so its inferred architecture may differ from the
    configured one in fields that change nothing. A misfit names the differing tensors and every
    differing architecture field (with the setting ``names`` gives for it).
    """
    card = model_card(obj, source)
    loaded = generator_from_checkpoint(obj, source)
    try:
        load_strict(netG, loaded.state_dict(), source)
    except CheckpointError as exc:
        fields = architecture_mismatch(netG.architecture, loaded.architecture, names)
        if not fields:
            raise
        raise CheckpointError(f"{exc}; the configured generator differs in {'; '.join(fields)}") from None
    return card
