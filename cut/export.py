"""Deployable generators: ONNX and TorchScript with dynamic batch, height and width, and their check.

Export records the plain-operator path of every layer (``cut.fast.plain.exporting``), the official
computation; the fast CPU kernels are for eager PyTorch. ``verify`` runs an exported model
(onnxruntime for ONNX, torch.jit for TorchScript) and measures it against the eager generator.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cut.checkpoint import CheckpointError, check_card

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "image", "translated"
OPSET = 17
CARD_KEY = "cut_model_card"  # ONNX metadata_props key; TorchScript extra file "<key>.json"
TOLERANCE = 1e-4  # max |exported - torch| / max |torch|


class ExportError(RuntimeError):
    """The exported model could not be written or does not compute what the generator computes."""


def input_channels(netG: nn.Module) -> int:
    """The channels a generator takes (``input_nc``; 3 for modules that do not say)."""
    return int(getattr(netG, "input_nc", 3))


def _example(netG: nn.Module, size: tuple[int, int]) -> torch.Tensor:
    return torch.zeros(1, input_channels(netG), *size)


def to_onnx(netG: nn.Module, size: tuple[int, int], card: dict[str, Any]) -> bytes:
    """ONNX (opset OPSET, TorchScript-based exporter) with dynamic batch, height and width; the
    model card is stored as JSON in the model's metadata."""
    import onnx

    axes = {0: "batch", 2: "height", 3: "width"}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
        torch.onnx.export(netG.eval(), (_example(netG, size),), buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes})
    model = onnx.load_from_string(buffer.getvalue())
    entry = model.metadata_props.add()
    entry.key, entry.value = CARD_KEY, json.dumps(card, sort_keys=True)
    return model.SerializeToString()


def to_torchscript(netG: nn.Module, size: tuple[int, int], card: dict[str, Any]) -> bytes:
    """A traced TorchScript module (shapes stay symbolic: the same module runs at any size); the
    model card is the extra file ``cut_model_card.json``."""
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices; torch.jit's deprecation in favour of torch.export
        traced = torch.jit.trace(netG.eval(), _example(netG, size), check_trace=False)
        torch.jit.save(traced, buffer, _extra_files={f"{CARD_KEY}.json": json.dumps(card, sort_keys=True)})
    return buffer.getvalue()


def _jit_load(data: bytes, extra_files: dict[str, str] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(io.BytesIO(data), map_location="cpu", _extra_files=extra_files or {})


def export_bytes(netG: nn.Module, fmt: str, size: tuple[int, int], card: dict[str, Any]) -> bytes:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return (to_onnx if fmt == "onnx" else to_torchscript)(netG, size, card)


class ExportedModel:
    """An exported generator, run by its own runtime: (N, C, H, W) float32 in [-1, 1] in and out."""

    def __init__(self, data: bytes, fmt: str, providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        self.format = fmt
        if fmt == "onnx":
            import onnxruntime

            available = onnxruntime.get_available_providers()
            chosen = [p for p in providers if p in available] or ["CPUExecutionProvider"]
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()  # as many as torch would use
            self._session = onnxruntime.InferenceSession(data, options, providers=chosen)
            self.providers = self._session.get_providers()
            self.input_nc = int(self._session.get_inputs()[0].shape[1])
            self.output_nc = int(self._session.get_outputs()[0].shape[1])
        else:
            self._module = _jit_load(data)
            self.providers = ["torch.jit"]
            architecture = card_of(data, fmt).get("architecture", {})
            self.input_nc = int(architecture.get("input_nc", 3))
            self.output_nc = int(architecture.get("output_nc", 3))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.format == "onnx":
            out = self._session.run([OUTPUT_NAME], {INPUT_NAME: x.detach().cpu().float().numpy()})[0]
            return torch.from_numpy(out)
        with torch.no_grad():
            return self._module(x.detach().cpu().float())


def card_of(data: bytes, fmt: str) -> dict[str, Any]:
    """The model card stored in an exported model ({} if none)."""
    if fmt == "onnx":
        import onnx

        props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
        return json.loads(props.get(CARD_KEY, "{}"))
    files = {f"{CARD_KEY}.json": ""}
    _jit_load(data, files)
    return json.loads(files[f"{CARD_KEY}.json"] or "{}")


def checked_onnx_card(data: bytes, source: str) -> dict[str, Any]:
    """The model card of an ONNX export, once its weights (initializers and constants) are known to be
    finite and its card sane (``cut.checkpoint.check_card``); else a CheckpointError naming ``source``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [(node.name or node.output[0], a.t) for node in graph.node if node.op_type == "Constant"
                for a in node.attribute if a.name == "value"]
    bad = [name for name, tensor in tensors if not _finite(numpy_helper.to_array(tensor))]
    if bad:
        raise CheckpointError(f"{source}: {len(bad)} of {len(tensors)} weights hold NaN or Inf "
                              f"(e.g. {bad[:3]})")
    props = {p.key: p.value for p in model.metadata_props}
    try:
        card = json.loads(props.get(CARD_KEY, "{}"))
    except ValueError as exc:
        raise CheckpointError(f"{source}: the model card ({CARD_KEY}) is not JSON: {exc}") from exc
    return check_card(card, source)


def _finite(array: np.ndarray) -> bool:
    return not np.issubdtype(array.dtype, np.floating) or bool(np.isfinite(array).all())


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """max |output - reference| / max |reference|."""
    if output.shape != reference.shape:
        return float("inf")
    scale = float(reference.abs().max().clamp(min=1e-12))
    return float((output.float() - reference.float()).abs().max()) / scale


def verify(netG: nn.Module, data: bytes, fmt: str, shapes: Sequence[tuple[int, int, int]],
           seed: int = 0) -> list[dict[str, Any]]:
    """Run the exported model and the eager generator on random inputs of each (batch, height,
    width); one record per shape. Raises ExportError when any differs by more than TOLERANCE."""
    model = ExportedModel(data, fmt)
    gen = torch.Generator().manual_seed(seed)
    records = []
    for batch, height, width in shapes:
        channels = input_channels(netG)
        x = torch.rand(batch, channels, height, width, generator=gen) * 2 - 1
        with torch.no_grad():
            reference = netG.eval()(x)
        error = relative_error(model(x), reference)
        records.append({"shape": [batch, channels, height, width], "relative_error": error,
                        "ok": error <= TOLERANCE})
    bad = [r for r in records if not r["ok"]]
    if bad:
        worst = max(bad, key=lambda r: r["relative_error"])
        raise ExportError(f"the {fmt} export differs from the generator: relative error "
                          f"{worst['relative_error']:.3g} at input shape {worst['shape']} (tolerance "
                          f"{TOLERANCE:g}); nothing was written")
    return records
