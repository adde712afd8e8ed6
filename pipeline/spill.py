"""Host tensors that live on local disk: large intermediate activations of tiled translation.

A tensor from ``SpillArena.empty`` larger than ``threshold`` bytes is backed by a memory-mapped file
under ``folder`` (unlinked at once: its disk space returns when the tensor is freed, also if the
process dies), so the kernel pages it in and out as it is read and written and the process's own
(anonymous) memory stays bounded whatever the image size. Smaller tensors are ordinary ones.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch


class SpillArena:
    """Allocates host tensors, spilling those over ``threshold`` bytes to files under ``folder``."""

    def __init__(self, folder: str, threshold: int = 256 * 2**20) -> None:
        self.folder, self.threshold = folder, threshold
        self.spilled_bytes = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = math.prod(shape)
        nbytes = numel * dtype.itemsize
        if nbytes <= self.threshold:
            return torch.empty(shape, dtype=dtype)
        os.makedirs(self.folder, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix="activation-", suffix=".bin", dir=self.folder)
        try:
            os.ftruncate(fd, nbytes)
            tensor = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.close(fd)
            os.unlink(path)
        self.spilled_bytes += nbytes
        return tensor.view(shape)
