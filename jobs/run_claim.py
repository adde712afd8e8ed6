"""Who may train a run, and which configs it used: rank 0 holds ``RUN/lease.json`` (pipeline.lease)
for the whole job, a resume must keep the run's config (``RUN/config.yaml``) but for the keys
``free_on_resume`` allows, and each config the run used is kept in ``RUN/config-history/``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from typing import Any

import torch
import torch.distributed as dist
import yaml

from jobs.config import TrainConfig, config_changes, free_on_resume, shapes_the_networks, to_yaml
from jobs.runtime import Runtime, default_loader_workers
from pipeline import storage
from pipeline.checkpoints import Checkpointer
from pipeline.lease import Lease, LeaseHeldError

log = logging.getLogger("jobs.train")

LEASE = "lease.json"  # RUN/lease.json: the run's owner (pipeline.lease)
CONFIG = "config.yaml"  # RUN/config.yaml: the config the run uses now
CONFIG_HISTORY = "config-history"  # RUN/config-history/NNNN-step-S.yaml: each config used, from step S


class RunClaimError(RuntimeError):
    """The run cannot be taken: another trainer owns it, or its stored config differs (exit 2)."""


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


def stored_config(run_url: str) -> tuple[str, dict[str, Any]] | None:
    """(text, values) of the run's RUN/config.yaml; None for a new run. RunClaimError when unreadable."""
    stored_url = storage.join(run_url.rstrip("/"), CONFIG)
    if not storage.exists(stored_url):
        return None
    text = storage.read_bytes(stored_url).decode()
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RunClaimError(f"{stored_url} is not readable YAML ({exc}); restore it or use a new "
                            f"run.url") from exc
    return text, values if isinstance(values, dict) else {}


def with_loader_workers(config: TrainConfig, device: torch.device) -> TrainConfig:
    """``config`` with data.workers null resolved: a resumed run keeps the count in its RUN/config.yaml
    (the order of the samples depends on it: an exact resume needs the same), a new run takes
    ``default_loader_workers``. A count given in the config is kept as it is."""
    if config.data.workers is not None:
        return config
    stored = stored_config(config.run.url)
    workers = stored[1].get("data", {}).get("workers") if stored else None
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        workers = default_loader_workers(device)
    return dataclasses.replace(config, data=dataclasses.replace(config.data, workers=workers))


def as_override(value: Any) -> str:
    """``value`` as a ``key=value`` override writes it (YAML: null, true, [0,4,8], plain strings)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def config_changes_on_resume(config: TrainConfig) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """(the run's stored RUN/config.yaml, or None for a new run; the keys ``config`` changes in it).
    RunClaimError when a key that shapes the networks changes (no checkpoint of the run would load),
    or keys other than FREE_ON_RESUME change without run.allow_config_change. Reads only: claim_run
    calls it before the run is accepted, ``record_config`` once it is."""
    run_url = config.run.url.rstrip("/")
    stored_url = storage.join(run_url, CONFIG)
    stored = stored_config(run_url)
    if stored is None:
        return None, []
    stored_text, stored_values = stored
    changes = config_changes(stored_values, yaml.safe_load(to_yaml(config)))
    preset = stored_values.get("model", {}).get("preset", config.model.preset)
    shaped = [(k, a, b) for k, a, b in changes if shapes_the_networks(k, preset)]
    if shaped:
        keys = ", ".join(f"{k} {a!r} (in {stored_url}) -> {b!r}" for k, a, b in shaped)
        again = " ".join(f"{k}={as_override(a)}" for k, a, _ in shaped)
        raise RunClaimError(
            f"{run_url} cannot resume with other network shapes: {keys}. Its checkpoints hold networks of "
            f"the stored shape, which no config change can load. Resume with {again}, or train a new "
            f"run.url (model.init_from takes a generator's weights into a new run of the same generator)")
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
    step = Checkpointer(storage.join(run_url, "checkpoints")).latest_step() or 0
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
