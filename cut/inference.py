"""Batched translation for bulk inference: uint8 (or uint16) in and out, asynchronous on CUDA, and
surviving device out-of-memory errors.

Pixels cross the bus as uint8 (4x fewer bytes than float32; uint16 for 16-bit images, whose outputs
are 16-bit too) and are scaled on the device; outputs
are quantised on the device and copied back once per batch into pinned memory, without blocking,
so the host can work on the previous batch meanwhile. A batch that does not fit is split in halves,
down to single images; an image that does not fit alone is reported (None) instead of stopping the
job. The largest batch that fitted for an input size is remembered, so later batches of that size
do not fail again first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """Network output in [-1, 1] to uint8 as the official test does: clamp, (y + 1) / 2 * 255, truncate.
    (y + 1) * 127.5 is the same float32 value (halving is exact), in one pass fewer."""
    return y.float().clamp(-1, 1).add_(1).mul_(127.5).to(torch.uint8)


def to_uint16(y: torch.Tensor) -> torch.Tensor:
    """Network output in [-1, 1] to 16-bit pixels: (y + 1) * 32767.5, rounded (no official rule to
    follow; unlike truncation, 16-bit pixels round-trip through ``from_pixels`` exactly in float32)."""
    return y.float().clamp(-1, 1).add_(1).mul_(32767.5).round_().to(torch.uint16)


def from_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 or uint16 pixels to [-1, 1]: v / 255 (or v / 65535) * 2 - 1 (``from_uint8`` for 8 bits)."""
    if x.dtype == torch.uint16:
        return x.float().div_(65535.0).sub_(0.5).div_(0.5)
    return from_uint8(x)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels to the network's [-1, 1] with the arithmetic of ToTensor + Normalize(0.5, 0.5)
    (the same float32 operations as ``pipeline.transforms.to_tensor``), on the tensor's device."""
    return x.float().div_(255.0).sub_(0.5).div_(0.5)


# CPU devices: torch's host allocator says "can't allocate memory"; tiling's host buffers raise MemoryError.
_OOM_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED",
                 "can't allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or any(m in str(exc) for m in _OOM_MESSAGES)


@dataclass
class PendingBatch:
    """A batch's outputs on their way to the host: (pixels, count) parts, where pixels is a (b, H, W, C)
    uint8 (uint16) CPU tensor, or None for one image that did not fit; `event` marks the copies' end
    on CUDA."""

    parts: list[tuple[torch.Tensor | None, int]] = field(default_factory=list)
    event: torch.cuda.Event | None = None

    def result(self) -> list[torch.Tensor | None]:
        """Per image: its (H, W, C) uint8 pixels, or None; waits for the device if needed."""
        if self.event is not None:
            self.event.synchronize()
        out: list[torch.Tensor | None] = []
        for pixels, count in self.parts:
            out += [None] * count if pixels is None else list(pixels)
        return out


class BatchTranslator:
    """Runs `forward` on (B, C, H, W) batches: uint8 pixels (scaled to [-1, 1] on the device) or floats
    in [-1, 1]. Outputs come back as uint8 (one device-to-host copy per batch, asynchronous on CUDA:
    `start` returns while the device works, `PendingBatch.result` waits), None per image that does
    not fit in device memory even alone."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 bf16: bool = False, channels_last: bool = False) -> None:
        self.forward = forward
        self.device = device
        self.bf16 = bf16
        self.channels_last = channels_last
        self.fitting: dict[tuple[int, ...], int] = {}  # input shape -> largest batch known to fit
        self.splits = 0

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        quantize = to_uint16 if x.dtype == torch.uint16 else to_uint8
        if not x.is_floating_point():
            x = from_pixels(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            y = self.forward(x)
        pixels = quantize(y).permute(0, 2, 3, 1).contiguous()  # free for channels_last outputs
        if self.device.type != "cuda":
            return pixels
        host = torch.empty(pixels.shape, dtype=pixels.dtype, pin_memory=True)
        return host.copy_(pixels, non_blocking=True)

    def start(self, x: torch.Tensor) -> PendingBatch:
        """Launch a batch (split where the device runs out of memory)."""
        shape = tuple(x.shape[1:])
        size = min(len(x), self.fitting.get(shape, len(x)))
        pending = PendingBatch()
        for start in range(0, len(x), size):
            self._fit(x[start:start + size], shape, pending)
        if self.device.type == "cuda":
            pending.event = torch.cuda.Event()
            pending.event.record()
        return pending

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        return self.start(x).result()

    def _fit(self, x: torch.Tensor, shape: tuple[int, ...], pending: PendingBatch) -> None:
        try:
            pending.parts.append((self._run(x), len(x)))
            return
        except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError, a library's allocation failure
            if not is_out_of_memory(exc):
                raise
        self._release()  # outside the handler, whose traceback holds the failed forward's tensors
        if len(x) == 1:
            self.fitting[shape] = 1
            pending.parts.append((None, 1))
            return
        self.splits += 1
        half = len(x) // 2
        self.fitting[shape] = min(self.fitting.get(shape, half), half)
        self._fit(x[:half], shape, pending)
        self._fit(x[half:], shape, pending)

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
