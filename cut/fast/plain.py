"""When the fast layers step aside: forwards that a tracer or exporter records, and forwards whose
gradient is differentiated again, run the official layers' plain operators instead."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

_plain = threading.local()


@contextlib.contextmanager
def plain_operators() -> Iterator[None]:
    """Forwards inside take the plain-operator path that exporters get (see ``exporting``): for
    passes whose gradient is differentiated again (the WGAN-GP penalty's ``create_graph``), since
    the fast blur and Winograd kernels have a first derivative only."""
    depth = getattr(_plain, "depth", 0)
    _plain.depth = depth + 1
    try:
        yield
    finally:
        _plain.depth = depth


def exporting() -> bool:
    """Whether a tracer or exporter (torch.jit.trace, torch.onnx.export, torch.export) is recording
    this forward, or ``plain_operators`` asks for what they get. The recorded graph must hold plain
    operators only: the fast CPU paths use native kernels and in-place writes into views, which
    exporters drop or cannot express (the ONNX exporter silently loses the blur's
    ``narrow().add_()``, giving outputs off by up to 1.8)."""
    if getattr(_plain, "depth", 0):
        return True
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_exporting()
