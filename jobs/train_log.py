"""What a training run reports as it goes: after its first steps, what the rest will cost (and, for a
long CPU run, how to get a first look sooner); a log line every ``train.log_every`` steps (losses, lr,
throughput, data wait, memory, ETA) and, on rank 0, TensorBoard scalars, image grids and, at the end,
the hyperparameters beside the final losses."""

from __future__ import annotations

import logging
import resource
import time
from collections import deque
from typing import Any

import torch

from jobs.config import TrainConfig
from pipeline.tensorboard import TensorBoard

log = logging.getLogger("jobs.train")


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


PACE_STEPS = 3  # steps timed, after the first (which builds kernels and starts the loader), for the cost
WORTH_SAYING_S = 60  # a run estimated to end sooner than this is not told its cost
LONG_CPU_RUN_S = 30 * 60  # a CPU run estimated longer than this is told how to get a first look sooner
FIRST_LOOK_CONFIG = "configs/fastcut-cpu.yaml"  # FastCUT sized for a CPU: minutes, not hours
FIRST_LOOK_S = 15 * 60  # the time train.max_steps is suggested for


def roughly(seconds: float) -> str:
    """A duration as a person says it: 40 s, 12 min, 7.1 h."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def cost_line(step: int, total_steps: int, seconds_per_step: float,
              device: torch.device) -> tuple[int, str] | None:
    """(log level, line): what the steps after ``step`` will cost at ``seconds_per_step``; a long run on
    a CPU, a warning with the two ways to a first look within minutes. None for a run about to end."""
    left = total_steps - step
    if left * seconds_per_step < WORTH_SAYING_S:
        return None
    line = (f"step {step}: {seconds_per_step:.2f} s/step on {device}, {left} steps to go: about "
            f"{roughly(left * seconds_per_step)}")
    if device.type != "cpu" or left * seconds_per_step <= LONG_CPU_RUN_S:
        return logging.INFO, line
    steps = max(1, int(FIRST_LOOK_S / seconds_per_step))
    return logging.WARNING, (f"{line}. For a first look within minutes: --config {FIRST_LOOK_CONFIG} "
                             f"(FastCUT at 128 pixels, 600 steps), or train.max_steps={step + steps} (about "
                             f"{roughly(steps * seconds_per_step)} more here; free to change on resume)")


def hparams(config: TrainConfig, model_config: Any, ranks: int, steps: int) -> dict[str, Any]:
    """The hyperparameters TensorBoard shows beside a run's final losses."""
    c = config
    return {
        "preset": c.model.preset,
        "ngf": c.model.ngf,
        "n_blocks": model_config.n_blocks,
        "crop_size": c.data.crop_size,
        "batch_size": c.train.batch_size,
        "ranks": ranks,
        "lr": c.train.lr,
        "lr_policy": c.train.lr_policy,
        "lambda_NCE": float(model_config.lambda_NCE),
        "steps": steps,
    }


def memory_mib(device: torch.device) -> float:
    """Peak memory: the device's on CUDA, the process's resident set elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TrainLog:
    """The losses and timings of the steps since the last report; ``tb`` is rank 0's TensorBoard."""

    def __init__(self, total_steps: int, images_per_step: int, device: torch.device,
                 tb: TensorBoard | None = None) -> None:
        self.total_steps, self.images_per_step = total_steps, images_per_step
        self.device, self.tb = device, tb
        self.recent: deque[dict[str, torch.Tensor]] = deque(maxlen=4)  # visuals of the last steps
        self.last_losses: dict[str, float] = {}
        self._paced_from: tuple[int, float] | None = None  # (step, time) timing starts at
        self._restart()

    def _restart(self) -> None:
        self.losses: list[dict[str, torch.Tensor]] = []
        self.wait, self.start, self.steps = 0.0, time.perf_counter(), 0

    def add(self, losses: dict[str, torch.Tensor], waited: float) -> None:
        """One step's losses (kept as tensors: no device sync until the report) and data wait."""
        self.losses.append(losses)
        self.wait += waited
        self.steps += 1

    def pace(self, step: int) -> None:
        """Times this process's first steps; once PACE_STEPS after the first are timed, logs what the
        rest of the run will cost (``cost_line``). Rank 0 calls it."""
        now = time.perf_counter()
        if self._paced_from is None:
            self._paced_from = (step, now)
        elif step - self._paced_from[0] == PACE_STEPS:
            cost = cost_line(step, self.total_steps, (now - self._paced_from[1]) / PACE_STEPS, self.device)
            if cost is not None:
                log.log(*cost)

    def report(self, step: int, epoch: int, lr: float, policy: str, skipped: int) -> None:
        """The log line (and scalars) of the steps since the last report."""
        elapsed = time.perf_counter() - self.start
        n = self.steps
        mean = {k: sum(float(d[k]) for d in self.losses) / n for k in self.losses[0]}
        self.last_losses = mean
        images_per_s = n * self.images_per_step / max(elapsed, 1e-9)
        memory = memory_mib(self.device)
        wait = self.wait / max(elapsed, 1e-9)
        eta = (self.total_steps - step) * elapsed / max(n, 1)
        log.info(
            "step %d/%d (%.1f%%) epoch %d: %s lr=%.3g (%s) images/s=%.2f data_wait=%.0f%% memory=%.0fMiB "
            "ETA %s",
            step,
            self.total_steps,
            100 * step / max(self.total_steps, 1),
            epoch,
            " ".join(f"{k}={v:.4f}" for k, v in mean.items()),
            lr,
            policy,
            images_per_s,
            100 * wait,
            memory,
            duration(eta),
        )
        if self.tb is not None:
            scalars = {f"loss/{k}": v for k, v in mean.items()}
            scalars.update({"lr": lr, "perf/images_per_s": images_per_s, "perf/data_wait": wait,
                            "perf/memory_mib": memory})
            scalars["data/skipped"] = float(skipped)
            self.tb.scalars(step, scalars)
            self.tb.sync()
        self._restart()

    def text(self, step: int, texts: dict[str, str]) -> None:
        """Markdown texts under their tags (rank 0)."""
        if self.tb is not None:
            for tag, markdown in texts.items():
                self.tb.text(tag, markdown, step)

    def visuals(self, step: int, visuals: dict[str, torch.Tensor], image_every: int) -> None:
        """Keep this step's visuals (references only: no copy, no device sync); every ``image_every``
        steps, show the last few steps' side by side."""
        if self.tb is None:
            return
        self.recent.append(visuals)
        if step % image_every == 0:
            self.tb.images(step, self._grids())

    def _grids(self) -> dict[str, torch.Tensor]:
        """Per visual, the samples of the last few steps (all of each batch, up to 8) side by side."""
        grids = {}
        for name in self.recent[-1]:
            samples = torch.cat([v[name].detach().float().cpu() for v in self.recent if name in v])
            grids[f"images/{name}"] = samples[-8:]
        return grids

    def close(self, params: dict[str, Any], metrics: dict[str, float]) -> None:
        """The hyperparameters beside the final losses and ``metrics`` (TensorBoard's HPARAMS tab)."""
        if self.tb is None:
            return
        metrics = {f"final/{k}": v for k, v in self.last_losses.items()} | metrics
        if metrics:
            self.tb.hparams(params, metrics)
        self.tb.close()
