"""Train CUT or FastCUT on shard sets, one process or many under torchrun, resuming by itself; SinCUT
on two single images (configs/sincut.yaml, one process).

    torchrun --nproc_per_node=8 -m jobs.train --config configs/cut.yaml run.url=s3://bucket/runs/h2z
    python -m jobs.train --config configs/tiny.yaml data.a=... data.b=... run.url=/tmp/run

Outputs under run.url: config.yaml, checkpoints/step-%09d/ (full training state; the newest
complete one is resumed automatically; one that cannot be read is set aside and the one before it
resumed), tb/ (TensorBoard), export/ (generator.pt for jobs.infer, an official-layout
latest_net_G.pth and model_card.json, written last, naming their step: the generator of the newest
checkpoint, rewritten with each and on resume when it is older), config-history/ (every config the run
used). In the training loop, SIGTERM or SIGINT saves a checkpoint and exits 0; before it, or a second
time, they end the run at once (exit 143 or 130).

One trainer per run: rank 0 holds RUN/lease.json for the whole job (a heartbeat every quarter of
run.lease_stale_after); a second trainer exits 2 naming the owner, unless the owner is gone (its process
on this host, or no heartbeat for run.lease_stale_after seconds) or is this torchrun job restarted. A
resume whose config differs from RUN/config.yaml in keys other than FREE_ON_RESUME (jobs/config.py)
exits 2 listing them, unless run.allow_config_change=true. Exit codes: 0 done or stopped by a signal
with a checkpoint saved, 1 a failure (data, checkpoint, a failed write), 2 a bad config, a run owned by
another trainer or a changed config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import socket
import sys
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cut import CheckpointError, CUTModel, export_generator, read_checkpoint
from cut.checkpoint import to_bytes
from cut.inception import InceptionWeightsError
from cut.schedule import OFFICIAL_PLATEAU_METRIC, LRSchedule
from jobs.cli import HelpFormatter, add_logging_arguments, run_job
from jobs.config import (
    SINCUT,
    ConfigError,
    TrainConfig,
    config_changes,
    cut_config,
    describe_keys,
    free_on_resume,
    load_config,
    resolve_train_config,
    to_dict,
    to_yaml,
)
from jobs.finetune import InitFromError, init_generator
from jobs.logs import setup_logging
from jobs.quality import HeldOutEvaluator
from jobs.runtime import Runtime, code_version, init_runtime, shutdown
from jobs.signals import StopSignals
from jobs.sincut import build_sincut
from jobs.tensorboard import TensorBoard
from pipeline import storage
from pipeline.checkpoints import CheckpointStore
from pipeline.corpus import is_shard_set
from pipeline.lease import Lease, LeaseHeldError, LeaseLostError
from pipeline.shards import ShardIndexError
from pipeline.unpaired import DataSetError, StreamPosition, UnpairedStream, freeze_listing

log = logging.getLogger("jobs.train")

STATE_BLOB = "state.pt"
LEASE = "lease.json"  # RUN/lease.json: the run's owner (pipeline.lease)
CONFIG = "config.yaml"  # RUN/config.yaml: the config the run uses now
CONFIG_HISTORY = "config-history"  # RUN/config-history/NNNN-step-S.yaml: each config used, from step S
EXPORT_CARD = "model_card.json"  # RUN/export/model_card.json: written last, names the export's step
Loaded = tuple[int, str, dict[str, Any]]  # a checkpoint's step, the URL of its state and the state


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class RunWriteError(RuntimeError):
    """A checkpoint or export could not be written (a full disk, a store refusing writes)."""


class RunClaimError(RuntimeError):
    """The run cannot be taken: another trainer owns it, or its stored config differs (exit 2)."""


class Trainer:
    """The training loop of one rank: model, stream, schedule, checkpoints, logs."""

    def __init__(self, config: TrainConfig, runtime: Runtime, signals: StopSignals | None = None,
                 lease: Lease | None = None) -> None:
        self.config = config
        self.rt = runtime
        self.signals = signals or StopSignals()
        self.lease = lease  # rank 0's lease on the run (claim_run), checked before each write
        t = config.train
        self.run_url = config.run.url.rstrip("/")
        self.model, self.stream = self._build()
        # Each rank draws its own patch positions and flips, as replicas do in the official code.
        self.model.generator.manual_seed(t.seed + 1 + 100_003 * runtime.rank)
        self.store = CheckpointStore(storage.join(self.run_url, "checkpoints"))
        # Every policy runs the official epoch loop: n_epochs + n_epochs_decay epochs (train.py).
        self.epochs = t.n_epochs + t.n_epochs_decay
        self.schedule = LRSchedule(t.lr_policy, t.lr, t.n_epochs, t.n_epochs_decay, t.lr_decay_iters)
        total = self.epochs * self.stream.steps_per_epoch
        self.total_steps = total if t.max_steps is None else min(total, t.max_steps)
        self.step = 0
        self.position = StreamPosition(0, 0)
        self.last_saved = -1
        # A host sync per step is free on CPU; on CUDA the stop/finite check runs every few steps.
        self.control_every = 1 if runtime.device.type == "cpu" else 10
        self.tb: TensorBoard | None = None  # rank 0's, opened once the run is accepted (run)
        self.recent: deque[dict[str, torch.Tensor]] = deque(maxlen=4)  # visuals of the last steps
        self.last_losses: dict[str, float] = {}
        self.last_scores: dict[str, float] = {}
        self.init_record: dict[str, Any] | None = None  # model.init_from, once loaded (the model card's)
        self.best_url = storage.join(self.store.root, "best")
        self.evaluator = None
        if config.eval.every and runtime.is_main:
            self.evaluator = HeldOutEvaluator(config.eval, config.data.crop_size, runtime.device,
                                              config.model.input_nc)

    def _build(self) -> tuple[Any, Any]:
        """(model, stream) of the preset's model family: SinCUT's (jobs.sincut) or CUT's. Both give the
        loop the same interface (train_step, state_dict, generator; iterate, steps_per_epoch, ...)."""
        if self.config.model.preset == SINCUT:
            return build_sincut(self.config, self.rt)
        c, t = self.config, self.config.train
        model = CUTModel(cut_config(c, self.rt.device.type), self.rt.device, seed=t.seed)
        stream = UnpairedStream(
            *self._domains(),
            load_size=c.data.load_size,
            crop_size=c.data.crop_size,
            batch_size=t.batch_size,
            seed=t.seed,
            rank=self.rt.rank,
            world_size=self.rt.world_size,
            workers=c.data.workers,
            flip=c.data.flip,
            channels=(c.model.input_nc, c.model.output_nc),
            preprocess=c.data.preprocess,
        )
        return model, stream

    def _domains(self) -> tuple[str | tuple[str, ...], str | tuple[str, ...]]:
        """(input, target) sources: data.a then data.b, or the reverse with model.direction BtoA (the
        official --direction swaps the domains the same way, models/cut_model.py set_input)."""
        a, b = self._source(self.config.data.a, "a"), self._source(self.config.data.b, "b")
        return (a, b) if self.config.model.direction == "AtoB" else (b, a)

    def _source(self, url: str, name: str) -> str | tuple[str, ...]:
        """A shard set as it is; a folder, prefix, glob or URL list frozen into RUN/data/<name>.txt on the
        run's first start (rank 0 lists it, the others read the frozen list), for exact resumes."""
        if is_shard_set(url):
            return url
        frozen = storage.join(self.run_url, "data", f"{name}.txt")
        if self.rt.is_main:
            files = freeze_listing(url, frozen)
        if self.rt.distributed:
            dist.barrier()
        if not self.rt.is_main:
            files = freeze_listing(url, frozen)
        log.info("data.%s: %d image files from %s (frozen in %s)", name, len(files), url, frozen)
        return files

    # -------------------------------------------------------------------------------------- state
    def _gather_rng(self) -> list[torch.Tensor]:
        state = self.model.generator.get_state()
        if not self.rt.distributed:
            return [state]
        states: list[Any] = [None] * self.rt.world_size
        dist.all_gather_object(states, state)
        return states

    def _state_bytes(self, rng: list[torch.Tensor]) -> bytes:
        return to_bytes(
            {
                "model": self.model.state_dict(),
                "rng": rng,
                "step": self.step,
                "stream": self.stream.state_dict(self.position),
                "schedule": self.schedule.state_dict(),
                "world_size": self.rt.world_size,
                "config": to_dict(self.config),
                "code_version": code_version(),
                "card": self.card(),
            }
        )

    def card(self) -> dict[str, Any]:
        """The model card every checkpoint and export carries: what the generator is and was made from."""
        c = self.config
        a_images, b_images = self.stream.a.total, self.stream.b.total
        if c.model.direction == "BtoA":
            a_images, b_images = b_images, a_images
        return {
            "preset": c.model.preset,
            "direction": c.model.direction,
            "input_domain": "a" if c.model.direction == "AtoB" else "b",
            "init_from": self.init_record,
            "architecture": dict(self.model.netG.architecture),
            "load_size": c.data.load_size,
            "crop_size": c.data.crop_size,
            "preprocess": getattr(self.stream, "card_preprocess",
                                  f"{c.data.preprocess} (training); official test resize to crop_size"),
            "data": {
                "a": c.data.a,
                "b": c.data.b,
                "a_images": a_images,
                "b_images": b_images,
            },
            "step": self.step,
            "eval_scores": dict(self.last_scores),
            "code_version": code_version(),
        }

    def save(self) -> None:
        """Rank 0 writes the full training state; every rank takes part (RNG gather, barrier)."""
        rng = self._gather_rng()
        if self.rt.is_main:
            if self.lease is not None:
                self.lease.check()
            try:
                folder = self.store.save(
                    self.step, {STATE_BLOB: self._state_bytes(rng), CONFIG: to_yaml(self.config).encode()}
                )
            except OSError as exc:
                raise RunWriteError(
                    f"step {self.step}: could not write the checkpoint under {self.store.root} ({exc}); it "
                    f"is not committed, a rerun resumes from the one before"
                ) from exc
            removed = self.store.prune(self.config.train.keep_last)
            log.info("step %d: saved checkpoint %s (pruned %s)", self.step, folder, removed or "none")
            self.export()  # export/ always holds the newest checkpoint's generator
        if self.rt.distributed:
            dist.barrier()
        self.last_saved = self.step

    def resume(self) -> bool:
        """Load the newest complete checkpoint that can be read, if any; returns whether one was loaded.

        An unreadable one is set aside (rank 0 renames it; a warning names it) and the one before it
        taken; all ranks then agree on the oldest choice among them. If checkpoints exist but none can
        be read, the run stops unless ``train.start_fresh_if_unreadable`` allows starting at step 0.
        """
        found = self._readable_state()
        if found is None:
            return False
        _, source, state = found
        self.model.load_state_dict(state["model"])
        self.step = int(state["step"])
        self.init_record = state.get("card", {}).get("init_from")  # what this run first started from
        rng = state["rng"]
        if len(rng) == self.rt.world_size:
            self.model.generator.set_state(rng[self.rt.rank])
        else:
            log.warning(
                "checkpoint from %d ranks, running %d: patch RNG reseeded", len(rng), self.rt.world_size
            )
            self.model.generator.manual_seed(self.config.train.seed + 1 + 100_003 * self.rt.rank + self.step)
        self.position = self.stream.position_from_state(state["stream"])
        self._restore_schedule(state.get("schedule"))
        self.last_saved = self.step
        best = storage.join(self.best_url, "metrics.json")
        if self.evaluator is not None and storage.exists(best):
            self.evaluator.best = json.loads(storage.read_bytes(best))["scores"].get(self.evaluator.metric)
        log.info("step %d: resumed from %s (epoch %d, step %d of it)", self.step, source, *self._pos())
        return True

    def apply_init_from(self, resumed: bool) -> bool:
        """Fine-tuning: a fresh run takes G's weights from ``model.init_from`` (D, F, optimizers and
        step stay fresh); a resumed run keeps its own and says so. Returns whether G was loaded."""
        url = self.config.model.init_from
        if not url:
            return False
        if resumed:
            log.info("model.init_from %s ignored: the run resumed from its own checkpoint at step %d",
                     url, self.step)
            return False
        self.init_record = init_generator(self.model.netG, url)
        log.info("step 0: generator initialised from %s (fine-tuning; D, F and optimizers fresh)",
                 self.init_record["file"])
        return True

    def _restore_schedule(self, saved: dict[str, Any] | None) -> None:
        """The saved schedule state; without one (or with other settings), the configured schedule
        replayed to the resumed epoch (exact: the official plateau metric is a constant)."""
        try:
            if saved is not None:
                self.schedule.load_state_dict(saved)
                return
            why = "the checkpoint has no schedule state"
        except ValueError as exc:
            why = str(exc)
        log.warning("%s: replaying lr_policy %s to epoch %d", why, self.schedule.policy, self.position.epoch)
        t = self.config.train
        self.schedule = LRSchedule(t.lr_policy, t.lr, t.n_epochs, t.n_epochs_decay, t.lr_decay_iters)

    def _readable_state(self) -> Loaded | None:
        steps = list(reversed(self.store.complete_steps()))
        set_aside = []
        chosen = None
        for step in steps:
            source = storage.join(self.store.root, f"step-{step:09d}", STATE_BLOB)
            try:
                chosen = (step, source, read_checkpoint(self.store.read(step, STATE_BLOB), source))
                break
            except (CheckpointError, FileNotFoundError) as exc:
                log.warning("step %d: checkpoint %s cannot be read (%s)", step, source, exc)
                if self.rt.is_main:
                    set_aside.append(self.store.set_aside(step))
                    log.warning("moved it aside to %s; resuming from the one before", set_aside[-1])
        chosen = self._agree(chosen)
        if chosen is None and steps:
            message = (
                f"no checkpoint under {self.store.root} can be read ({len(steps)} unreadable, set "
                f"aside); set train.start_fresh_if_unreadable=true to start again at step 0"
            )
            if not self.config.train.start_fresh_if_unreadable:
                raise CheckpointError(message)
            log.warning("%s: starting at step 0 as train.start_fresh_if_unreadable allows", message)
        return chosen

    def _agree(self, chosen: Loaded | None) -> Loaded | None:
        """The same checkpoint on every rank: the oldest any rank chose (-1: none)."""
        if not self.rt.distributed:
            return chosen
        step = torch.tensor(-1 if chosen is None else chosen[0])
        dist.all_reduce(step, op=dist.ReduceOp.MIN)
        if int(step) == (-1 if chosen is None else chosen[0]):
            return chosen
        if int(step) < 0:
            return None
        source = storage.join(self.store.root, f"step-{int(step):09d}", STATE_BLOB)
        return int(step), source, read_checkpoint(self.store.read(int(step), STATE_BLOB), source)

    def evaluate(self) -> None:
        """Score G on the held-out set (rank 0); keep the state as ``checkpoints/best`` if it improved."""
        rng = self._gather_rng()
        if self.evaluator is not None:
            scores = self.evaluator(self.model.netG)
            self.last_scores = {k: float(v) for k, v in scores.items()}
            log.info("step %d: evaluation %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in scores.items()))
            if self.tb is not None:
                self.tb.scalars(self.step, {f"eval/{k}": v for k, v in scores.items()})
            if self.evaluator.improves(scores):
                storage.write_bytes_atomic(storage.join(self.best_url, STATE_BLOB), self._state_bytes(rng))
                summary = {"step": self.step, "metric": self.evaluator.metric, "scores": scores}
                storage.write_bytes_atomic(
                    storage.join(self.best_url, "metrics.json"), json.dumps(summary).encode()
                )
                log.info(
                    "step %d: new best %s, saved under %s", self.step, self.evaluator.metric, self.best_url
                )
        if self.rt.distributed:
            dist.barrier()

    def _pos(self) -> tuple[int, int]:
        return self.position.epoch, self.position.step

    # --------------------------------------------------------------------------------------- loop
    def _control(self, losses: dict[str, torch.Tensor]) -> tuple[bool, bool]:
        """(stop requested on any rank, non-finite loss on any rank), agreed by all ranks; every rank
        raises LeaseLostError once rank 0's heartbeat found the run taken over by another trainer."""
        bad = ~torch.isfinite(torch.stack([v.float() for v in losses.values()])).all()
        lost = self.lease is not None and self.lease.lost is not None
        flags = torch.stack([torch.tensor(self.signals.is_set(), device=bad.device), bad,
                             torch.tensor(lost, device=bad.device)]).to(torch.int32)
        if self.rt.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        stop, nonfinite, lost = (bool(v) for v in flags.tolist())
        if lost:
            raise LeaseLostError(f"step {self.step}: the run was taken over by another trainer "
                                 f"({self.lease.lost if self.lease else 'seen by rank 0'}); stopping without "
                                 f"writing")
        return stop, nonfinite

    def _batches(self) -> Iterator[tuple[dict[str, Any], float]]:
        """(batch, seconds waited for it) until the schedule or max_steps ends; advances the position."""
        t = self.config.train
        while self.position.epoch < self.epochs and self.step < self.total_steps:
            epoch = self.position.epoch
            # The schedule steps once per finished epoch (officially at its end), before the next starts.
            self.model.set_lr(self.schedule.advance_to(epoch, OFFICIAL_PLATEAU_METRIC))
            batches = self.stream.iterate(self.position, decay=epoch >= t.n_epochs)
            while True:
                t0 = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                yield batch, time.perf_counter() - t0
                if self.step >= self.total_steps:
                    return
            self.position = StreamPosition(epoch + 1, 0)

    def train(self) -> str:
        """Run to the end or to a stop request; returns 'done' or 'preempted'."""
        window: dict[str, Any] = {"losses": [], "wait": 0.0, "start": time.perf_counter(), "steps": 0}
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            unit="step",
            desc="train",
            dynamic_ncols=True,
            disable=not (self.rt.is_main and sys.stderr.isatty()),
        )
        try:
            return self._loop(window, bar)
        finally:
            bar.close()

    def _loop(self, window: dict[str, Any], bar: tqdm) -> str:
        t = self.config.train
        for batch, waited in self._batches():
            losses = self.model.train_step(batch["A"], batch["B"], sync=False)
            self.step += 1
            bar.update()
            self.position = StreamPosition(self.position.epoch, self.position.step + 1)
            window["losses"].append(losses)
            window["wait"] += waited
            window["steps"] += 1
            due_save = self.step % t.checkpoint_every == 0
            if self.step % self.control_every == 0 or due_save or self.step == self.total_steps:
                stop, nonfinite = self._control(losses)
                if nonfinite:
                    kept = f"step {self.last_saved}" if self.last_saved >= 0 else "none written yet"
                    raise NonFiniteLossError(
                        f"step {self.step}: non-finite loss {self._floats(losses)}; stopping. Last good "
                        f"checkpoint: {kept}, under {self.store.root}"
                    )
                if stop:
                    self.save()
                    why = self.signals.requested.name if self.signals.requested else "on another rank"
                    log.info("step %d: stop requested (%s), checkpoint saved, exiting", self.step, why)
                    return "preempted"
            if due_save:
                self.save()
            if self.config.eval.every and self.step % self.config.eval.every == 0:
                self.evaluate()
            if self.step % t.log_every == 0:
                self._log(window)
                window = {"losses": [], "wait": 0.0, "start": time.perf_counter(), "steps": 0}
            if self.tb is not None:
                self.recent.append(self.model.visuals)  # references only: no copy, no device sync
                if self.step % t.image_every == 0:
                    self.tb.images(self.step, self._grids())
        if self.last_saved != self.step:
            self.save()
        return "done"

    def _grids(self) -> dict[str, torch.Tensor]:
        """Per visual, the samples of the last few steps (all of each batch, up to 8) side by side."""
        grids = {}
        for name in self.recent[-1]:
            samples = torch.cat([v[name].detach().float().cpu() for v in self.recent if name in v])
            grids[f"images/{name}"] = samples[-8:]
        return grids

    @staticmethod
    def _floats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
        return {k: round(float(v), 5) for k, v in losses.items()}

    def _log(self, window: dict[str, Any]) -> None:
        elapsed = time.perf_counter() - window["start"]
        n = window["steps"]
        mean = {k: sum(float(d[k]) for d in window["losses"]) / n for k in window["losses"][0]}
        self.last_losses = mean
        images_per_s = n * self.config.train.batch_size * self.rt.world_size / max(elapsed, 1e-9)
        if self.rt.device.type == "cuda":
            memory = torch.cuda.max_memory_allocated(self.rt.device) / 2**20
        else:
            memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        lr = self.model.opt_G.param_groups[0]["lr"]
        wait = window["wait"] / max(elapsed, 1e-9)
        eta = (self.total_steps - self.step) * elapsed / max(n, 1)
        log.info(
            "step %d/%d (%.1f%%) epoch %d: %s lr=%.3g (%s) images/s=%.2f data_wait=%.0f%% memory=%.0fMiB "
            "ETA %s",
            self.step,
            self.total_steps,
            100 * self.step / max(self.total_steps, 1),
            self.position.epoch,
            " ".join(f"{k}={v:.4f}" for k, v in mean.items()),
            lr,
            self.schedule.policy,
            images_per_s,
            100 * wait,
            memory,
            _duration(eta),
        )
        if self.tb is not None:
            scalars = {f"loss/{k}": v for k, v in mean.items()}
            scalars.update(
                {
                    "lr": lr,
                    "perf/images_per_s": images_per_s,
                    "perf/data_wait": wait,
                    "perf/memory_mib": memory,
                }
            )
            scalars["data/skipped"] = float(self.stream.skipped)
            self.tb.scalars(self.step, scalars)
            self.tb.sync()

    # ------------------------------------------------------------------------------------- outputs
    def export(self) -> None:
        """The generator alone: our export for jobs.infer and the official latest_net_G.pth, then the
        model card naming their step (written last: a card of this step means both files are of it)."""
        g = self.model.netG
        meta = {
            "preset": self.config.model.preset,
            "step": self.step,
            "code_version": code_version(),
            "card": self.card(),
        }
        official = {k: v.detach().cpu() for k, v in g.state_dict().items()}
        files = {
            "generator.pt": to_bytes(export_generator(g, **meta)),
            "latest_net_G.pth": to_bytes(official),
            EXPORT_CARD: json.dumps(meta, indent=1, default=str).encode(),
        }
        for name, data in files.items():
            url = storage.join(self.run_url, "export", name)
            try:
                storage.write_bytes_atomic(url, data)
            except OSError as exc:
                raise RunWriteError(
                    f"step {self.step}: checkpoint committed, but writing its export {url} failed ({exc}); "
                    f"export/ is older than the newest checkpoint until a rerun rewrites it"
                ) from exc
        log.info("step %d: exported the generator to %s", self.step, storage.join(self.run_url, "export"))

    def export_step(self) -> int | None:
        """The step export/ holds by its model card; None when it has none (or cannot be read)."""
        try:
            card = storage.read_bytes(storage.join(self.run_url, "export", EXPORT_CARD))
            return int(json.loads(card)["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def ensure_export(self) -> None:
        """Rewrite export/ from the resumed checkpoint when it holds another step (an export whose
        write failed after its checkpoint committed, one from before a checkpoint was set aside)."""
        held = self.export_step()
        if held != self.step:
            log.warning("step %d: export/ holds %s, not the newest checkpoint: rewriting it", self.step,
                        "no model card" if held is None else f"step {held}")
            self.export()

    def run(self) -> int:
        resumed = self.resume()
        if resumed and self.rt.is_main:
            self.ensure_export()
        self.apply_init_from(resumed)
        if self.rt.is_main:  # the run is accepted (resumed or started, model.init_from loaded)
            record_config(self.config)
            self.tb = TensorBoard(storage.join(self.run_url, "tb"))
        if self.rt.distributed:
            device_ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            # batch norm over the global batch where torch can (SyncBatchNorm is GPU-only); on CPU
            # ranks every rank normalises its own batch
            self.model.wrap(lambda net: DistributedDataParallel(net, device_ids=device_ids),
                            sync_batch_norm=self.rt.device.type == "cuda")
        t = self.config.train
        limit = (
            f", stopping at max_steps {t.max_steps}"
            if self.total_steps < self.epochs * self.stream.steps_per_epoch
            else ""
        )
        log.info(
            "training %s for %d steps: %d epochs (%d + %d) of %d steps%s, lr %g by policy %s; %d rank(s), "
            "batch %d each, device %s, from step %d",
            self.config.model.preset,
            self.total_steps,
            self.epochs,
            t.n_epochs,
            t.n_epochs_decay,
            self.stream.steps_per_epoch,
            limit,
            t.lr,
            self.schedule.describe(),
            self.rt.world_size,
            t.batch_size,
            self.rt.device,
            self.step,
        )
        if self.tb is not None:
            self.tb.text("config", f"```yaml\n{to_yaml(self.config)}```", self.step)
            self.tb.text("model_card", self._model_card(), self.step)
        self.signals.graceful = True  # a first SIGTERM/SIGINT now checkpoints and exits 0
        try:
            self.train()
        finally:
            self.signals.graceful = False
            if self.tb is not None:
                self._write_hparams()
                self.tb.close()
        return 0

    def _model_card(self) -> str:
        """The model card (as checkpoints carry it) and how this run trains, as a Markdown table."""
        t = self.config.train
        params = {
            name: sum(p.numel() for p in net.parameters())
            for name, net in (("G", self.model.netG), ("D", self.model.netD), ("F", self.model.netF))
        }
        rows = [(k, json.dumps(v) if isinstance(v, dict) else v) for k, v in self.card().items()]
        rows += [
            ("parameters", ", ".join(f"{k} {v:,}" for k, v in params.items())),
            ("batch", f"{t.batch_size} per rank x {self.rt.world_size} ranks"),
            (
                "schedule",
                f"{self.total_steps} steps, lr {t.lr}, {t.n_epochs} + {t.n_epochs_decay} epochs, "
                f"lr_policy {self.schedule.describe()}",
            ),
            ("device", str(self.rt.device)),
        ]
        return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)

    def _write_hparams(self) -> None:
        """Hyperparameters beside the final losses (and the best evaluation score, if any)."""
        c = self.config
        params = {
            "preset": c.model.preset,
            "ngf": c.model.ngf,
            "n_blocks": self.model.config.n_blocks,
            "crop_size": c.data.crop_size,
            "batch_size": c.train.batch_size,
            "ranks": self.rt.world_size,
            "lr": c.train.lr,
            "lr_policy": c.train.lr_policy,
            "lambda_NCE": float(self.model.config.lambda_NCE),
            "steps": self.step,
        }
        metrics = {f"final/{k}": v for k, v in self.last_losses.items()}
        if self.evaluator is not None and self.evaluator.best is not None:
            metrics[f"best/{self.evaluator.metric}"] = float(self.evaluator.best)
        if metrics:
            self.tb.hparams(params, metrics)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def job_id() -> str | None:
    """What a restarted rank 0 of this torchrun job shares with the one before it: the rendezvous id
    (--rdzv-id; --standalone draws one per torchrun), else, with torchrun's default id "none", its agent
    process on this host; None outside torchrun."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id is None:
        return None
    if run_id and run_id != "none":
        return f"torchrun {run_id}"
    return f"torchrun agent {socket.gethostname()}:{os.getppid()}"


def config_changes_on_resume(config: TrainConfig) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """(the run's stored RUN/config.yaml, or None for a new run; the keys ``config`` changes in it).
    RunClaimError when keys other than FREE_ON_RESUME change without run.allow_config_change. Reads
    only: claim_run calls it before the run is accepted, ``record_config`` once it is."""
    run_url = config.run.url.rstrip("/")
    stored_url = storage.join(run_url, CONFIG)
    if not storage.exists(stored_url):
        return None, []
    stored_text = storage.read_bytes(stored_url).decode()
    try:
        stored = yaml.safe_load(stored_text)
    except yaml.YAMLError as exc:
        raise RunClaimError(f"{stored_url} is not readable YAML ({exc}); restore it or use a new "
                            f"run.url") from exc
    changes = config_changes(stored if isinstance(stored, dict) else {}, yaml.safe_load(to_yaml(config)))
    fixed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes if not free_on_resume(k))
    if fixed and not config.run.allow_config_change:
        raise RunClaimError(
            f"{run_url} was trained with another config ({stored_url}); changed: {fixed}. Resume with the "
            f"run's config, or pass run.allow_config_change=true to go on with this one (each config the run "
            f"used is kept in {storage.join(run_url, CONFIG_HISTORY)}/)")
    return stored_text, changes


def record_config(config: TrainConfig) -> None:
    """Keep each config the run used in config-history/ and make config.yaml the current one (after
    ``config_changes_on_resume`` has accepted it; a resume with the same config writes nothing)."""
    run_url = config.run.url.rstrip("/")
    history = storage.join(run_url, CONFIG_HISTORY)
    stored_text, changes = config_changes_on_resume(config)
    if stored_text is not None and not changes:
        return
    kept = sorted(storage.list_files(history)) if storage.exists(history) else []
    if stored_text is not None:
        fixed = any(not free_on_resume(k) for k, _, _ in changes)
        log.log(logging.WARNING if fixed else logging.INFO, "resuming %s with a changed config: %s", run_url,
                ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes))
        if not kept:  # a run from before config-history/ was kept: its first config goes in first
            kept = [storage.join(history, "0001-step-000000000.yaml")]
            storage.write_bytes_atomic(kept[0], stored_text.encode())
    step = CheckpointStore(storage.join(run_url, "checkpoints")).latest_step() or 0
    current = to_yaml(config).encode()
    storage.write_bytes_atomic(storage.join(history, f"{len(kept) + 1:04d}-step-{step:09d}.yaml"), current)
    storage.write_bytes_atomic(storage.join(run_url, CONFIG), current)


def claim_run(config: TrainConfig, runtime: Runtime) -> Lease | None:
    """Rank 0 takes the run's lease (held until ``release``) and checks the config against the run's
    (``config_changes_on_resume``); every rank learns the outcome. RunClaimError on every rank when
    the run is another trainer's or its config changed. Returns rank 0's lease (None on the others)."""
    lease, refused = None, None
    if runtime.is_main:
        lease = Lease(storage.join(config.run.url.rstrip("/"), LEASE), job=job_id(),
                      stale_after=config.run.lease_stale_after)
        try:
            lease.acquire()
            config_changes_on_resume(config)
        except LeaseHeldError as exc:
            refused = (f"run {config.run.url} is being trained by another trainer: {exc}. One trainer per "
                       f"run: wait for it or stop it; a dead owner's lease is taken over once it has had no "
                       f"heartbeat for run.lease_stale_after ({config.run.lease_stale_after:g} s)")
        except RunClaimError as exc:
            refused = str(exc)
        except BaseException:
            lease.release()
            raise
        if refused:
            lease.release()
    if runtime.distributed:
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused:
        raise RunClaimError(refused)
    return lease


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description=__doc__,
        epilog="config keys (YAML sections, or key.sub=value on the command line):\n"
        + describe_keys(TrainConfig),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML config file (configs/cut.yaml, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (keys below)")
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    add_logging_arguments(parser)
    return parser


def load_train_config(args: argparse.Namespace) -> TrainConfig:
    """The validated, preset-resolved config a parsed command line describes (ConfigError if bad)."""
    return resolve_train_config(load_config(TrainConfig, args.config, args.overrides))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_train_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.print_config:
        print(to_yaml(config), end="")
        return 0
    signals = StopSignals()
    with signals.installed():
        runtime = init_runtime(config.train.device)
        setup_logging(runtime.rank, args.log_format)
        torch.manual_seed(config.train.seed)
        finished = False
        lease = None
        try:
            lease = claim_run(config, runtime)
            code = Trainer(config, runtime, signals, lease).run()
            finished = True
            return code
        except (RunClaimError, LeaseLostError) as exc:
            if runtime.is_main:  # one line, not one per rank
                log.error("%s", exc)
            return 2
        except InitFromError as exc:  # a bad model.init_from is bad input: exit 2, as in every job
            log.error("%s", exc)
            return 2
        except (
            ConfigError,
            NonFiniteLossError,
            CheckpointError,
            InceptionWeightsError,
            FileNotFoundError,
            ShardIndexError,
            DataSetError,
            RunWriteError,
        ) as exc:
            log.error("%s", str(exc).strip().splitlines()[-1])
            return 1
        finally:
            if lease is not None:
                lease.release()
                storage.remove_empty_folder(config.run.url)  # a refused fresh run leaves no folder
            shutdown(runtime, wait_for_peers=finished)


if __name__ == "__main__":
    run_job(main)
