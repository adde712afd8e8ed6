"""Batched translation that survives device out-of-memory errors.

A batch that does not fit is split in halves, down to single images; an image that does not fit
alone is reported (None) instead of stopping the job. The largest batch that fitted for an input
size is remembered, so later batches of that size do not fail again first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def to_uint8(y: torch.Tensor) -> torch.Tensor:
    """Network output in [-1, 1] to uint8 as the official test does: clamp, scale, truncate."""
    return ((y.float().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)


_OOM_MESSAGES = ("out of memory", "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or any(m in str(exc) for m in _OOM_MESSAGES)


class BatchTranslator:
    """Runs `forward` on (B, C, H, W) batches in [-1, 1]; returns (H, W, C) uint8 CPU tensors per image,
    None where an image does not fit in device memory even alone."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 bf16: bool = False, channels_last: bool = False) -> None:
        self.forward = forward
        self.device = device
        self.bf16 = bf16
        self.channels_last = channels_last
        self.fitting: dict[tuple[int, ...], int] = {}  # input shape -> largest batch known to fit
        self.splits = 0

    @torch.inference_mode()
    def _run(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            y = self.forward(x)
        return list(to_uint8(y).permute(0, 2, 3, 1).cpu())

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        shape = tuple(x.shape[1:])
        size = min(len(x), self.fitting.get(shape, len(x)))
        out: list[torch.Tensor | None] = []
        for start in range(0, len(x), size):
            out += self._fit(x[start:start + size], shape)
        return out

    def _fit(self, x: torch.Tensor, shape: tuple[int, ...]) -> list[torch.Tensor | None]:
        try:
            return self._run(x)
        except RuntimeError as exc:  # torch.OutOfMemoryError, or a library's allocation failure
            if not is_out_of_memory(exc):
                raise
        self._release()  # outside the handler, whose traceback holds the failed forward's tensors
        if len(x) == 1:
            self.fitting[shape] = 1
            return [None]
        self.splits += 1
        half = len(x) // 2
        self.fitting[shape] = min(self.fitting.get(shape, half), half)
        return self._fit(x[:half], shape) + self._fit(x[half:], shape)

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
