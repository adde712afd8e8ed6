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
exits 2 listing them, unless run.allow_config_change=true; one that changes the networks' shapes
(SHAPES_THE_NETWORKS: model.ngf, ...) exits 2 naming the key and both values in any case. A rerun of a
complete run says so in one line and exits 0, writing nothing. After its first steps a run logs what the
rest will cost (on a CPU, when long, how to get a first look in minutes). Exit codes: 0 done or stopped
by a signal with a checkpoint saved, 1 a failure (data, checkpoint, a failed write), 2 a bad config, a
run owned by another trainer or a changed config.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cut import CheckpointError, CUTModel, read_checkpoint
from cut.checkpoint import to_bytes
from cut.inception import InceptionWeightsError
from cut.schedule import OFFICIAL_PLATEAU_METRIC, LRSchedule
from cut.sincut import SinCUTModel
from jobs.cli import HelpFormatter, add_logging_arguments, run_job
from jobs.config import (
    SINCUT,
    ConfigError,
    TrainConfig,
    cut_config,
    describe_keys,
    load_config,
    resolve_train_config,
    sincut_config,
    to_dict,
    to_yaml,
)
from jobs.finetune import InitFromError, init_generator
from jobs.logs import setup_logging
from jobs.quality import HeldOutEvaluator
from jobs.run_claim import CONFIG, RunClaimError, claim_run, record_config, with_loader_workers
from jobs.run_export import EXPORT, card_markdown, export_step, model_card, write_export
from jobs.runtime import Runtime, code_version, init_runtime, shutdown
from jobs.signals import StopSignals
from jobs.train_log import TrainLog, hparams
from pipeline import storage
from pipeline.checkpoints import Checkpointer, CheckpointWriteError, NoReadableCheckpoint, RankRNG
from pipeline.corpus import is_shard_set
from pipeline.lease import Lease, LeaseLostError
from pipeline.shards import ShardIndexError
from pipeline.single_image import SingleImageStream, read_single_image
from pipeline.tensorboard import TensorBoard
from pipeline.unpaired import DataSetError, FrozenTable, StreamPosition, UnpairedStream, freeze_source

log = logging.getLogger("jobs.train")


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------- wiring
def build_model_and_stream(config: TrainConfig, rt: Runtime) -> tuple[Any, Any]:
    """(model, stream) of the preset's family, SinCUT's or CUT's. Both give the loop the same interface
    (train_step, state_dict, generator, netG; iterate, state_dict, position_from_state, steps_per_epoch)."""
    c, t = config, config.train
    if c.model.preset == SINCUT:
        if rt.distributed:
            raise ConfigError(f"model.preset SinCUT trains in one process; got {rt.world_size} ranks "
                              "(run python -m jobs.train without torchrun)")
        a, b = read_single_image(c.data.a, "data.a"), read_single_image(c.data.b, "data.b")
        if c.model.direction == "BtoA":
            a, b = b, a
        log.info("SinCUT: source %s (%dx%d), target %s (%dx%d)", a.url, *a.image.size, b.url, *b.image.size)
        stream = SingleImageStream(a, b, t.batch_size, c.data.crop_size, c.data.crops_per_epoch, t.seed,
                                   c.data.flip, c.data.workers, rt.rank)
        return SinCUTModel(sincut_config(c), rt.device, seed=t.seed), stream
    model = CUTModel(cut_config(c, rt.device.type), rt.device, seed=t.seed)
    stream = UnpairedStream(
        *domains(config, rt),
        load_size=c.data.load_size,
        crop_size=c.data.crop_size,
        batch_size=t.batch_size,
        seed=t.seed,
        rank=rt.rank,
        world_size=rt.world_size,
        workers=c.data.workers,
        flip=c.data.flip,
        channels=(c.model.input_nc, c.model.output_nc),
        preprocess=c.data.preprocess,
    )
    return model, stream


def domains(config: TrainConfig, rt: Runtime) -> tuple[str | tuple[str, ...] | FrozenTable,
                                                      str | tuple[str, ...] | FrozenTable]:
    """(input, target) sources: data.a then data.b, or the reverse with model.direction BtoA (the
    official --direction swaps the domains the same way, models/cut_model.py set_input)."""
    a, b = data_source(config, rt, config.data.a, "a"), data_source(config, rt, config.data.b, "b")
    return (a, b) if config.model.direction == "AtoB" else (b, a)


def data_source(config: TrainConfig, rt: Runtime, url: str, name: str) -> str | tuple[str, ...] | FrozenTable:
    """A shard set as it is; a table, or a folder, prefix, glob or URL list, frozen into
    RUN/data/<name>.table.json or RUN/data/<name>.txt on the run's first start (rank 0 lists it, the
    others read what it froze), for exact resumes."""
    if is_shard_set(url):
        return url
    frozen = storage.join(config.run.url.rstrip("/"), "data", name)
    if rt.is_main:
        found = freeze_source(url, frozen)
    if rt.distributed:
        dist.barrier()
    if not rt.is_main:
        found = freeze_source(url, frozen)
    what = "table rows" if isinstance(found, FrozenTable) else "image files"
    log.info("data.%s: %d %s from %s (frozen in %s.*)", name, len(found), what, url, frozen)
    return found


def gather_objects(rt: Runtime) -> Callable[[Any], list[Any]]:
    """Every rank's value of something, on every rank (a collective)."""
    def gather(value: Any) -> list[Any]:
        if not rt.distributed:
            return [value]
        values: list[Any] = [None] * rt.world_size
        dist.all_gather_object(values, value)
        return values
    return gather


def min_over_ranks(rt: Runtime) -> Callable[[int], int] | None:
    """The smallest of the ranks' integers (a collective); None in one process."""
    if not rt.distributed:
        return None

    def smallest(value: int) -> int:
        tensor = torch.tensor(value)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor)
    return smallest


def new_schedule(config: TrainConfig) -> LRSchedule:
    t = config.train
    return LRSchedule(t.lr_policy, t.lr, t.n_epochs, t.n_epochs_decay, t.lr_decay_iters)


def restored_schedule(config: TrainConfig, saved: dict[str, Any] | None, epoch: int) -> LRSchedule:
    """The schedule a checkpoint saved; without one (or with other settings), the configured schedule,
    replayed to the resumed ``epoch`` as the loop advances (exact: the official plateau metric is a
    constant)."""
    schedule = new_schedule(config)
    try:
        if saved is not None:
            schedule.load_state_dict(saved)
            return schedule
        why = "the checkpoint has no schedule state"
    except ValueError as exc:
        why = str(exc)
    log.warning("%s: replaying lr_policy %s to epoch %d", why, schedule.policy, epoch)
    return new_schedule(config)


# ---------------------------------------------------------------------------------------- trainer
class Trainer:
    """One rank's training: the components it is wired from (below), the state a checkpoint holds
    (``state``, ``resume``), and the loop (``train``)."""

    def __init__(self, config: TrainConfig, runtime: Runtime, signals: StopSignals | None = None,
                 lease: Lease | None = None) -> None:
        config = with_loader_workers(config, runtime.device)  # main has; a Trainer built directly may not
        t, rt = config.train, runtime
        self.config, self.rt, self.signals = config, rt, signals or StopSignals()
        self.lease = lease  # rank 0's lease on the run (claim_run), checked before each write
        self.run_url = config.run.url.rstrip("/")
        self.model, self.stream = build_model_and_stream(config, rt)
        # Each rank draws its own patch positions and flips, as replicas do in the official code.
        patch_seed = t.seed + 1 + 100_003 * rt.rank
        self.model.generator.manual_seed(patch_seed)
        self.rng = RankRNG(self.model.generator, rt.rank, rt.world_size, gather_objects(rt),
                           reseed=lambda: patch_seed + self.step)
        self.checkpointer = Checkpointer(
            storage.join(self.run_url, "checkpoints"), encode=to_bytes, decode=read_checkpoint,
            unreadable=(CheckpointError,), is_main=rt.is_main, agree=min_over_ranks(rt),
            guard=lease.check if lease is not None else None, logger=log)
        # Every policy runs the official epoch loop: n_epochs + n_epochs_decay epochs (train.py).
        self.epochs = t.n_epochs + t.n_epochs_decay
        self.schedule = new_schedule(config)
        total = self.epochs * self.stream.steps_per_epoch
        self.total_steps = total if t.max_steps is None else min(total, t.max_steps)
        self.step, self.position, self.last_saved = 0, StreamPosition(0, 0), -1
        # A host sync per step is free on CPU; on CUDA the stop/finite check runs every few steps.
        self.control_every = 1 if rt.device.type == "cpu" else 10
        self.logs = TrainLog(self.total_steps, t.batch_size * rt.world_size, rt.device)  # tb: once accepted
        self.init_record: dict[str, Any] | None = None  # model.init_from, once loaded (the model card's)
        self.last_scores: dict[str, float] = {}
        self.evaluator = None
        if config.eval.every and rt.is_main:
            self.evaluator = HeldOutEvaluator(config.eval, config.data.crop_size, rt.device,
                                              config.model.input_nc)

    # -------------------------------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        """What a checkpoint holds (Stateful components and plain values), in state.pt's order."""
        return {
            "model": self.model,
            "rng": self.rng,
            "step": self.step,
            "stream": self.stream.state_dict(self.position),
            "schedule": self.schedule,
            "world_size": self.rt.world_size,
            "config": to_dict(self.config),
            "code_version": code_version(),
            "card": self.card(),
        }

    def card(self) -> dict[str, Any]:
        return model_card(self.config, self.model.netG, self.stream, self.step, self.init_record,
                          self.last_scores)

    def save(self) -> None:
        """Rank 0 writes the full training state and exports its generator; every rank takes part."""
        folder = self.checkpointer.save(self.step, self.state(), {CONFIG: to_yaml(self.config).encode()},
                                        keep_last=self.config.train.keep_last)
        if folder is not None:
            self.export()  # export/ always holds the newest checkpoint's generator
        if self.rt.distributed:
            dist.barrier()
        self.last_saved = self.step

    def resume(self) -> bool:
        """Continue from the newest checkpoint that can be read, if any; returns whether one was. When
        checkpoints exist but none can be read, the run stops unless train.start_fresh_if_unreadable."""
        try:
            found = self.checkpointer.load({"model": self.model})
        except NoReadableCheckpoint as exc:
            message = f"{exc}; set train.start_fresh_if_unreadable=true to start again at step 0"
            if not self.config.train.start_fresh_if_unreadable:
                raise CheckpointError(message) from None
            log.warning("%s: starting at step 0 as train.start_fresh_if_unreadable allows", message)
            return False
        if found is None:
            return False
        _, source, state = found
        self.step = int(state["step"])
        self.init_record = state.get("card", {}).get("init_from")  # what this run first started from
        self.rng.load_state_dict(state["rng"])  # after the step: a reseed depends on it
        self.position = self.stream.position_from_state(state["stream"])
        self.schedule = restored_schedule(self.config, state.get("schedule"), self.position.epoch)
        self.last_saved = self.step
        best = self.checkpointer.best_summary() if self.evaluator is not None else None
        if best is not None:
            self.evaluator.best = best["scores"].get(self.evaluator.metric)
        if not self.complete:  # a complete run says so instead (run)
            log.info("step %d: resumed from %s (epoch %d, step %d of it)", self.step, source,
                     self.position.epoch, self.position.step)
        return True

    @property
    def complete(self) -> bool:
        """Whether the run has trained all the steps its schedule and train.max_steps allow."""
        return self.step >= self.total_steps

    def complete_line(self) -> str:
        """What a rerun of a complete run says: its step, its export, and how to train on."""
        t = self.config.train
        generator = storage.join(self.run_url, EXPORT, "generator.pt")
        if self.total_steps < self.epochs * self.stream.steps_per_epoch:
            longer = f"to train longer, rerun with a larger train.max_steps (now {t.max_steps})"
        else:
            longer = (f"its schedule ({t.n_epochs} + {t.n_epochs_decay} epochs of "
                      f"{self.stream.steps_per_epoch} steps) is over: to train longer, raise "
                      f"train.n_epochs_decay with run.allow_config_change=true, or fine-tune a new run "
                      f"from it (model.init_from)")
        return (f"{self.run_url} is already trained: step {self.step} of {self.total_steps}, its generator "
                f"in {generator}; nothing to do. {longer[0].upper()}{longer[1:]}")

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

    def export(self) -> None:
        write_export(self.run_url, self.model.netG, self.config.model.preset, self.step, self.card())

    def evaluate(self) -> None:
        """Score G on the held-out set (rank 0); keep the state as ``checkpoints/best`` if it improved."""
        rng = self.rng.state_dict()  # every rank: the gather is a collective
        if self.evaluator is not None:
            scores = self.evaluator(self.model.netG)
            self.last_scores = {k: float(v) for k, v in scores.items()}
            log.info("step %d: evaluation %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in scores.items()))
            if self.logs.tb is not None:
                self.logs.tb.scalars(self.step, {f"eval/{k}": v for k, v in scores.items()})
            if self.evaluator.improves(scores):
                state = self.checkpointer.snapshot({**self.state(), "rng": rng})  # the card has the scores
                summary = {"step": self.step, "metric": self.evaluator.metric, "scores": scores}
                folder = self.checkpointer.keep_best(state, summary)
                log.info("step %d: new best %s, saved under %s", self.step, self.evaluator.metric, folder)
        if self.rt.distributed:
            dist.barrier()

    # --------------------------------------------------------------------------------------- loop
    def _stop_requested(self, losses: dict[str, torch.Tensor]) -> bool:
        """Whether a stop was requested on any rank, agreed by all ranks; every rank raises
        NonFiniteLossError when a loss on any rank is NaN or infinite, and LeaseLostError once rank
        0's heartbeat found the run taken over by another trainer."""
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
        if nonfinite:
            kept = f"step {self.last_saved}" if self.last_saved >= 0 else "none written yet"
            floats = {k: round(float(v), 5) for k, v in losses.items()}
            raise NonFiniteLossError(f"step {self.step}: non-finite loss {floats}; stopping. Last good "
                                     f"checkpoint: {kept}, under {self.checkpointer.root}")
        return stop

    def _batches(self) -> Iterator[tuple[dict[str, Any], float]]:
        """(batch, seconds waited for it) until the schedule or max_steps ends; the schedule steps once
        per finished epoch (officially at its end), before the next starts."""
        while self.position.epoch < self.epochs and self.step < self.total_steps:
            epoch = self.position.epoch
            self.model.set_lr(self.schedule.advance_to(epoch, OFFICIAL_PLATEAU_METRIC))
            batches = self.stream.iterate(self.position, decay=epoch >= self.config.train.n_epochs)
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
        t, every = self.config.train, self.config.eval.every
        show = self.rt.is_main and sys.stderr.isatty()
        with tqdm(total=self.total_steps, initial=self.step, unit="step", desc="train", dynamic_ncols=True,
                  disable=not show) as bar:
            for batch, waited in self._batches():
                losses = self.model.train_step(batch["A"], batch["B"], sync=False)
                self.step += 1
                bar.update()
                self.position = StreamPosition(self.position.epoch, self.position.step + 1)
                self.logs.add(losses, waited)
                if self.rt.is_main:
                    self.logs.pace(self.step)
                due_save = self.step % t.checkpoint_every == 0
                check = self.step % self.control_every == 0 or due_save or self.step == self.total_steps
                if check and self._stop_requested(losses):  # raises on a non-finite loss, a lost lease
                    self.save()
                    why = self.signals.requested.name if self.signals.requested else "on another rank"
                    log.info("step %d: stop requested (%s), checkpoint saved, exiting", self.step, why)
                    return "preempted"
                if due_save:
                    self.save()
                if every and self.step % every == 0:
                    self.evaluate()
                if self.step % t.log_every == 0:
                    self.logs.report(self.step, self.position.epoch, self.model.opt_G.param_groups[0]["lr"],
                                     self.schedule.policy, self.stream.skipped)
                self.logs.visuals(self.step, self.model.visuals, t.image_every)
        if self.last_saved != self.step:
            self.save()
        return "done"

    # ---------------------------------------------------------------------------------------- run
    def run(self) -> int:
        """Resume (or start), take the run, train, and close the logs; returns the exit code."""
        resumed = self.resume()
        if resumed and self.rt.is_main and (held := export_step(self.run_url)) != self.step:
            log.warning("step %d: export/ holds %s, not the newest checkpoint: rewriting it", self.step,
                        "no model card" if held is None else f"step {held}")
            self.export()  # its write failed after its checkpoint committed, or that one was set aside
        if resumed and self.complete:  # a rerun of a finished run: one line, nothing written
            if self.rt.is_main:
                log.info("%s", self.complete_line())
            return 0
        self.apply_init_from(resumed)
        if self.rt.is_main:  # the run is accepted (resumed or started, model.init_from loaded)
            record_config(self.config)
            self.logs.tb = TensorBoard(storage.join(self.run_url, "tb"))
        if self.rt.distributed:
            device_ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            # batch norm over the global batch where torch can (SyncBatchNorm is GPU-only); on CPU
            # ranks every rank normalises its own batch
            self.model.wrap(lambda net: DistributedDataParallel(net, device_ids=device_ids),
                            sync_batch_norm=self.rt.device.type == "cuda")
        self._announce()
        self.signals.graceful = True  # a first SIGTERM/SIGINT now checkpoints and exits 0
        try:
            self.train()
        finally:
            self.signals.graceful = False
            best = self.evaluator.best if self.evaluator is not None else None
            self.logs.close(hparams(self.config, self.model.config, self.rt.world_size, self.step),
                            {} if best is None else {f"best/{self.evaluator.metric}": float(best)})
        return 0

    def _announce(self) -> None:
        """The plan of the run, in the log and (rank 0) on TensorBoard with the config and model card."""
        t, rt = self.config.train, self.rt
        stopped_early = self.total_steps < self.epochs * self.stream.steps_per_epoch
        log.info(
            "training %s for %d steps: %d epochs (%d + %d) of %d steps%s, lr %g by policy %s; %d rank(s), "
            "batch %d each, device %s, from step %d",
            self.config.model.preset, self.total_steps, self.epochs, t.n_epochs, t.n_epochs_decay,
            self.stream.steps_per_epoch, f", stopping at max_steps {t.max_steps}" if stopped_early else "",
            t.lr, self.schedule.describe(), rt.world_size, t.batch_size, rt.device, self.step,
        )
        how = [("batch", f"{t.batch_size} per rank x {rt.world_size} ranks"),
               ("schedule", f"{self.total_steps} steps, lr {t.lr}, {t.n_epochs} + {t.n_epochs_decay} epochs, "
                            f"lr_policy {self.schedule.describe()}"),
               ("device", str(rt.device))]
        m = self.model
        self.logs.text(self.step, {
            "config": f"```yaml\n{to_yaml(self.config)}```",
            "model_card": card_markdown(self.card(), {"G": m.netG, "D": m.netD, "F": m.netF}, how),
        })


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
            config = with_loader_workers(config, runtime.device)
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
            CheckpointWriteError,
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
