"""Who plans an inference job, and how the other workers wait for the plan (`pipeline.plan`).

The first worker to find no plan creates ``OUT/_plan/lock`` exclusively and plans; while it lists,
a thread rewrites the lock every few seconds. The others poll for ``plan.json``. A lock that has
not changed for `STALE_AFTER` seconds (or whose holder is a dead process on this host) is taken
over. Whatever the locks do, only one ``plan.json`` can be created, so two planners at once cost
a second listing, never two plans.

On a rerun, worker 0 lists the inputs again (unless told not to) and compares them with the plan.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pipeline import storage
from pipeline.manifest import SUCCESS, committed_units
from pipeline.plan import (
    JobPlan,
    PlanError,
    check_identity,
    check_input_urls,
    compare_inputs,
    extend_plan,
    list_inputs,
    load_plan,
    make_plan,
    plan_dir,
    plan_json_url,
)

log = logging.getLogger(__name__)

HEARTBEAT = 5.0  # seconds between lock rewrites while planning
STALE_AFTER = 120.0  # seconds a lock may stay unchanged before another worker takes over


def _lock_url(out: str) -> str:
    return storage.join(plan_dir(out), "lock")


def _lock_body(worker: int, beat: int) -> bytes:
    return json.dumps({"worker": worker, "host": socket.gethostname(), "pid": os.getpid(), "beat": beat,
                       "time": time.time()}).encode()


def _read_lock(out: str) -> bytes | None:
    try:
        return storage.read_bytes(_lock_url(out))
    except FileNotFoundError:
        return None


def _holder_is_dead(lock: bytes) -> bool:
    """Whether the lock's holder is a process of this host that no longer runs."""
    try:
        body = json.loads(lock)
        pid = int(body["pid"])
    except (ValueError, KeyError, TypeError):
        return False
    same_host = body.get("host") == socket.gethostname()
    return same_host and pid != os.getpid() and not storage.process_running(pid)


@contextmanager
def _holding_lock(out: str, worker: int) -> Iterator[None]:
    """Keep the planning lock fresh while the body runs; remove it afterwards."""
    done = threading.Event()

    def beat() -> None:
        n = 1
        while not done.wait(HEARTBEAT):
            try:
                storage.write_bytes_atomic(_lock_url(out), _lock_body(worker, n))
            except OSError as exc:  # a missed beat only risks a second planner, never a second plan
                log.warning("could not refresh the planning lock: %s", exc)
            n += 1

    thread = threading.Thread(target=beat, name="plan-lock", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        storage.remove(_lock_url(out))


def _plan_as(out: str, worker: int, inputs: Sequence[str], identity: dict[str, Any],
             unit_size: int) -> JobPlan:
    """Plan holding the lock (already taken); a plan committed meanwhile wins."""
    plan = load_plan(out)
    if plan is not None:
        storage.remove(_lock_url(out))
        return plan
    if committed_units(out):
        storage.remove(_lock_url(out))
        raise PlanError(f"{out} holds manifest parts but no plan ({plan_json_url(out)}): it was written by "
                        f"an older version or its plan was removed; use a new --out")
    log.info("worker %d plans the job: listing %d inputs", worker, len(inputs))
    with _holding_lock(out, worker):
        plan = make_plan(out, inputs, identity, unit_size)
    log.info("planned %d inputs in %d units: %s", plan.items, plan.units, plan_json_url(out))
    return plan


def _missing_folders(out: str) -> list[str]:
    """The local folders that writing the planning lock creates (innermost first)."""
    return [url for url in (plan_dir(out), out) if storage.is_local(url) and not storage.exists(url)]


def _plan_leaving_nothing_on_failure(out: str, worker: int, inputs: Sequence[str], identity: dict[str, Any],
                                     unit_size: int, made: list[str]) -> JobPlan:
    """`_plan_as`; when planning fails (an input that does not list), the folders the lock made go
    too, so a refused run leaves the storage as it found it."""
    try:
        return _plan_as(out, worker, inputs, identity, unit_size)
    except BaseException:
        for folder in made:
            storage.remove_empty_folder(folder)
        raise


def _plan_or_wait(out: str, worker: int, inputs: Sequence[str], identity: dict[str, Any], unit_size: int,
                  timeout: float) -> JobPlan:
    """Plan if nobody is planning; else wait for the plan, taking over from a planner that died."""
    deadline = time.monotonic() + timeout
    seen, since, poll = None, time.monotonic(), 0.5
    missing = [url for url in inputs if not storage.has_glob(url) and not storage.exists(url)]
    if missing:  # refused before the lock is written: a refusal leaves the storage as it was
        raise FileNotFoundError(f"no input at {', '.join(missing)}; nothing was written")
    while True:
        plan = load_plan(out)
        if plan is not None:
            return plan
        lock = _read_lock(out)
        if lock is None:
            made = _missing_folders(out)
            if storage.write_bytes_exclusive(_lock_url(out), _lock_body(worker, 0)):
                return _plan_leaving_nothing_on_failure(out, worker, inputs, identity, unit_size, made)
        if lock is not None and lock != seen:
            seen, since = lock, time.monotonic()
        if lock is not None and (time.monotonic() - since > STALE_AFTER or _holder_is_dead(lock)):
            log.warning("the planning lock %s has not moved for %.0f s: taking over", _lock_url(out),
                        time.monotonic() - since)
            storage.write_bytes_atomic(_lock_url(out), _lock_body(worker, 0))
            return _plan_as(out, worker, inputs, identity, unit_size)
        if time.monotonic() > deadline:
            raise PlanError(f"no plan at {plan_json_url(out)} after {timeout:.0f} s while another worker "
                            f"holds {_lock_url(out)} (see its log), or raise --plan-timeout")
        time.sleep(poll)
        poll = min(poll * 1.5, 5.0)


def obtain_plan(out: str, inputs: Sequence[str], identity: dict[str, Any], unit_size: int, *, worker: int,
                check_inputs: bool = True, add_new_inputs: bool = False, timeout: float = 3600.0) -> JobPlan:
    """The job's plan for this worker: made or awaited when there is none; checked against this run's
    identity; on worker 0's rerun, checked against a new listing of the inputs (`check_inputs`) and
    extended with the new ones if `add_new_inputs`.

    PlanError (FileNotFoundError for a missing input) when the plan does not fit this run; a refusal
    writes nothing.
    """
    check_input_urls(out, inputs)
    plan = load_plan(out)
    if plan is None:
        plan = _plan_or_wait(out, worker, inputs, identity, unit_size, timeout)
        check_identity(plan, identity)
        return plan
    check_identity(plan, identity)
    if worker != 0 or not check_inputs:
        return plan
    listings = list_inputs(out, [i.url for i in plan.inputs])
    changes = compare_inputs(plan, listings)
    if not changes:
        return plan
    report = "\n  ".join(c.describe() for c in changes)
    if not add_new_inputs:
        raise PlanError(
            f"the inputs list differently than when the plan was made ({plan.created}); nothing was "
            f"written.\n  {report}\nTo translate the new inputs into this output as new units, rerun "
            f"with --add-new-inputs; to finish the planned inputs only, rerun with --skip-input-check; "
            f"or give a new --out.")
    log.warning("inputs changed since the plan; adding the new ones as new units:\n  %s", report)
    if any(c.gone or c.changed for c in changes):
        log.warning("planned inputs that are gone or changed stay planned: unless already translated, "
                    "they become error rows")
    extended = extend_plan(plan, listings, changes)
    storage.remove(storage.join(out, SUCCESS))
    return extended
