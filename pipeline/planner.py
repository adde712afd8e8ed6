"""Who plans an inference job, and how the other workers wait for the plan (`pipeline.plan`).

The first worker to find no plan takes ``OUT/_plan/lock``, a `pipeline.lease.Lease` (created
exclusively, its heartbeat rewriting it every few seconds while the holder lists), and plans. The
others poll for ``plan.json``; a lock they have seen unchanged for `STALE_AFTER` seconds, with no
heartbeat for as long, or whose holder is a dead process on this host, is taken over. Whatever the
locks do, only one ``plan.json`` can be created, so two planners at once cost a second listing, never
two plans.

On a rerun, worker 0 lists the inputs again (unless told not to) and compares them with the plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from pipeline import storage
from pipeline.lease import Lease, LeaseHeldError
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
from pipeline.tables import TableOptions

log = logging.getLogger(__name__)

HEARTBEAT = 5.0  # seconds between lock rewrites while planning
STALE_AFTER = 120.0  # seconds a lock may stay unchanged before another worker takes over


def _lock_url(out: str) -> str:
    return storage.join(plan_dir(out), "lock")


def _plan_holding(out: str, lock: Lease, worker: int, inputs: Sequence[str], identity: dict[str, Any],
                  unit_size: int, tables: TableOptions | None = None) -> JobPlan:
    """Plan holding the lock (released afterwards); a plan committed meanwhile wins."""
    try:
        plan = load_plan(out)
        if plan is not None:
            return plan
        if committed_units(out):
            raise PlanError(f"{out} holds manifest parts but no plan ({plan_json_url(out)}): it was written "
                            f"by an older version or its plan was removed; use a new --out")
        log.info("worker %d plans the job: listing %d input location(s)", worker, len(inputs))
        plan = make_plan(out, inputs, identity, unit_size, tables)
        log.info("planned %d images in %d units: %s", plan.items, plan.units, plan_json_url(out))
        return plan
    finally:
        lock.release()


def _missing_folders(out: str) -> list[str]:
    """The local folders that writing the planning lock creates (innermost first): the plan folder,
    --out and every missing folder above it."""
    missing = []
    url = plan_dir(out)
    while storage.is_local(url) and not storage.exists(url):
        missing.append(url)
        parent = storage.dirname(url)
        if parent in ("", url.rstrip("/")):  # a relative path's first folder, or the root
            break
        url = parent
    return missing


def _plan_leaving_nothing_on_failure(out: str, lock: Lease, worker: int, inputs: Sequence[str],
                                     identity: dict[str, Any], unit_size: int, made: list[str],
                                     tables: TableOptions | None = None) -> JobPlan:
    """`_plan_holding`; when planning fails (an input that does not list), the folders the lock made go
    too, so a refused run leaves the storage as it found it."""
    try:
        return _plan_holding(out, lock, worker, inputs, identity, unit_size, tables)
    except BaseException:
        for folder in made:
            storage.remove_empty_folder(folder)
        raise


def _plan_or_wait(out: str, worker: int, inputs: Sequence[str], identity: dict[str, Any], unit_size: int,
                  timeout: float, tables: TableOptions | None = None) -> JobPlan:
    """Plan if nobody is planning; else wait for the plan, taking over from a planner that died."""
    deadline = time.monotonic() + timeout
    poll = 0.5
    missing = [url for url in inputs if not storage.has_glob(url) and not storage.exists(url)]
    if missing:  # refused before the lock is written: a refusal leaves the storage as it was
        raise FileNotFoundError(f"no input at {', '.join(missing)}; nothing was written")
    lock = Lease(_lock_url(out), stale_after=STALE_AFTER, heartbeat=HEARTBEAT)
    while True:
        plan = load_plan(out)
        if plan is not None:
            return plan
        made = _missing_folders(out)
        try:
            lock.acquire(attempts=1)
        except LeaseHeldError:
            pass
        else:
            return _plan_leaving_nothing_on_failure(out, lock, worker, inputs, identity, unit_size, made,
                                                    tables)
        if time.monotonic() > deadline:
            raise PlanError(f"no plan at {plan_json_url(out)} after {timeout:.0f} s while another worker "
                            f"holds {_lock_url(out)} (see its log), or raise --plan-timeout")
        time.sleep(poll)
        poll = min(poll * 1.5, 5.0)


def obtain_plan(out: str, inputs: Sequence[str], identity: dict[str, Any], unit_size: int, *, worker: int,
                check_inputs: bool = True, add_new_inputs: bool = False, timeout: float = 3600.0,
                tables: TableOptions | None = None) -> JobPlan:
    """The job's plan for this worker: made or awaited when there is none; checked against this run's
    identity; on worker 0's rerun, checked against a new listing of the inputs (`check_inputs`) and
    extended with the new ones if `add_new_inputs`. Table inputs are opened with `tables`' column
    options (`pipeline.tables`).

    PlanError (FileNotFoundError for a missing input) when the plan does not fit this run; a refusal
    writes nothing.
    """
    check_input_urls(out, inputs)
    plan = load_plan(out)
    if plan is None:
        plan = _plan_or_wait(out, worker, inputs, identity, unit_size, timeout, tables)
        check_identity(plan, identity)
        return plan
    check_identity(plan, identity)
    if worker != 0 or not check_inputs:
        return plan
    listings = list_inputs(out, [i.url for i in plan.inputs], tables)
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
