"""A lease on a folder of any fsspec storage: one owner at a time, kept alive by a heartbeat.

The owner creates the lease object exclusively (``storage.write_bytes_exclusive``) and a thread
rewrites it every ``heartbeat`` seconds with the time. Another process that finds the lease takes it
over only when the owner cannot be alive or is its own job:

- the lease names the same job id (e.g. a restarted rank 0 of the same torchrun job);
- its owner is a process of this host (and PID namespace) that no longer runs;
- its last heartbeat is older than ``stale_after`` seconds (an owner that died on another host, a
  preempted pod; hosts' clocks must agree to well within the window);
- this process has seen the lease object unchanged for ``stale_after`` seconds (``acquire`` called
  again and again while waiting, as the inference planner does: no clocks to agree).

Otherwise ``LeaseHeldError`` names the owner. Two successors of one dead owner race for a claim
object created exclusively (``<lease>.takeover-<the dead owner's token>``): one wins. The owner checks
before each heartbeat that the lease still names it; ``check()`` raises ``LeaseLostError`` when
another process took it over (an owner frozen for longer than the window).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pipeline import storage

log = logging.getLogger(__name__)


class LeaseHeldError(RuntimeError):
    """Another live owner holds the lease."""


class LeaseLostError(RuntimeError):
    """The lease was taken over by another process while this one held it."""


def _pid_namespace() -> int:
    """This process's PID namespace (0 where unknown): PIDs of two containers are not comparable."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass(frozen=True)
class Owner:
    """Who holds a lease, as the lease object records it."""

    host: str
    pid: int
    pidns: int
    job: str | None
    since: float  # when this owner took the lease (epoch seconds)
    time: float | None  # its last heartbeat (None: the object does not say)
    token: str  # unique per acquisition

    @classmethod
    def parse(cls, data: bytes) -> Owner:
        """The owner a lease object names (what it leaves out unknown: no PID namespace, heartbeat time
        or token); one without a host and pid names an unknown, long-dead owner."""
        token = hashlib.sha256(data).hexdigest()[:32]
        try:
            body = json.loads(data)
            beat = body.get("time")
            return cls(str(body["host"]), int(body["pid"]), int(body.get("pidns", 0)), body.get("job"),
                       float(body.get("since", beat or 0.0)), None if beat is None else float(beat),
                       str(body.get("token", token)))
        except (ValueError, KeyError, TypeError, AttributeError):
            return cls("?", 0, 0, None, 0.0, 0.0, token)

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        beat = "unknown" if self.time is None else f"{max(0.0, time.time() - self.time):.0f} s ago"
        return f"host {self.host} pid {self.pid}{job}, owner since {_iso(self.since)}, last heartbeat {beat}"


class Lease:
    """The lease at ``url`` for this process (``job``: an id its restarted successors share)."""

    def __init__(self, url: str, *, job: str | None = None, stale_after: float = 120.0,
                 heartbeat: float | None = None) -> None:
        self.url = url
        self.job = job
        self.stale_after = stale_after
        self.heartbeat = stale_after / 4 if heartbeat is None else heartbeat
        self.me = Owner(socket.gethostname(), os.getpid(), _pid_namespace(), job, time.time(), time.time(),
                        uuid.uuid4().hex)
        self.taken_from: Owner | None = None  # the owner this one took over from, if any
        self._seen: tuple[bytes, float] | None = None  # the lease object as last read, and since when
        self.lost: str | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------- acquiring
    def acquire(self, attempts: int = 5) -> None:
        """Hold the lease, taking over a dead owner's (see the module); LeaseHeldError if alive."""
        current: Owner | None = None
        for attempt in range(attempts):
            if storage.write_bytes_exclusive(self.url, self._body()):
                return self._start()
            try:
                data = storage.read_bytes(self.url)
            except FileNotFoundError:  # released meanwhile
                continue
            if self._seen is None or self._seen[0] != data:
                self._seen = (data, time.monotonic())
            current = Owner.parse(data)
            why = self.takeover_reason(current, time.monotonic() - self._seen[1])
            if why is None:
                break
            if storage.write_bytes_exclusive(self._claim_url(current), self._body()):
                storage.write_bytes_atomic(self.url, self._body())
                self.taken_from = current
                log.warning("took over the lease %s from %s: %s", self.url, current.describe(), why)
                return self._start()
            time.sleep(0.2 * (attempt + 1))  # another successor claimed it: read who won
        who = current.describe() if current else "another process"
        raise LeaseHeldError(f"{who} holds the lease {self.url}")

    def takeover_reason(self, owner: Owner, unchanged_for: float = 0.0) -> str | None:
        """Why ``owner`` may be taken over (None: it may be alive and is another job's);
        ``unchanged_for``: how long this process has seen its lease object unchanged."""
        if self.job and owner.job == self.job:
            return f"it is this job's ({self.job}), restarted"
        same_host = owner.host == self.me.host and owner.pidns in (0, self.me.pidns)
        if same_host and owner.pid != self.me.pid and not storage.process_running(owner.pid):
            return f"its process {owner.pid} on this host is gone"
        age = None if owner.time is None else time.time() - owner.time
        if age is not None and age > self.stale_after:
            return f"no heartbeat for {age:.0f} s (stale after {self.stale_after:g} s)"
        if unchanged_for > self.stale_after:
            return f"unchanged for {unchanged_for:.0f} s (stale after {self.stale_after:g} s)"
        return None

    def _claim_url(self, owner: Owner) -> str:
        return f"{self.url}.takeover-{owner.token}"

    def _body(self) -> bytes:
        return json.dumps(asdict(self.me) | {"time": time.time(), "since_utc": _iso(self.me.since)}).encode()

    # ---------------------------------------------------------------------------------- holding
    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(self.heartbeat):
            try:
                if self._lost():
                    log.error("lost the lease %s: %s", self.url, self.lost)
                    return
                storage.write_bytes_atomic(self.url, self._body(), durable=False)
            except OSError as exc:  # a missed beat is harmless unless the window passes
                log.warning("could not refresh the lease %s: %s", self.url, exc)

    def _lost(self) -> bool:
        """Whether the lease no longer names this process (sets ``lost`` to what happened)."""
        if self.lost is None:
            try:
                holder: Owner | None = Owner.parse(storage.read_bytes(self.url))
            except FileNotFoundError:
                holder = None
            if holder is None:
                self.lost = "removed by another process"
            elif holder.token != self.me.token:
                self.lost = f"now held by {holder.describe()}"
        return self.lost is not None

    def check(self) -> None:
        """LeaseLostError unless the lease still names this process, read now: an owner frozen for
        longer than the window and taken over must not write when it wakes."""
        if self._lost():
            raise LeaseLostError(f"the lease {self.url} was taken over ({self.lost}); stopping without "
                                 f"writing")

    def release(self) -> None:
        """Stop the heartbeat; remove the lease if it still names this process."""
        if self._thread is None:
            return
        self._done.set()
        self._thread.join()
        self._thread = None
        try:
            if Owner.parse(storage.read_bytes(self.url)).token == self.me.token:
                storage.remove(self.url)
            if self.taken_from is not None:
                storage.remove(self._claim_url(self.taken_from))
        except OSError as exc:  # the lease goes stale by itself
            log.warning("could not remove the lease %s: %s", self.url, exc)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
