"""SIGTERM and SIGINT for the jobs: a graceful first stop where a job has work to finish, else at once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("jobs")


class StopSignals:
    """SIGTERM and SIGINT for a job. While ``graceful`` (a training loop, a worker translating), the
    first signal only asks the job to stop: it finishes what it must (a checkpoint, the complete
    units) and exits on its own. Otherwise, and on any second signal, the process exits at once
    with 128 + the signal number (143 for SIGTERM, 130 for SIGINT).

    Ctrl-C reaches every process of the terminal's group: the job's DataLoader workers (forked, so
    they inherit this handler) ignore it, since the job stops them itself; under torchrun only the
    first rank says so at WARNING, the others at INFO, so a stop is announced once."""

    def __init__(self) -> None:
        self.graceful = False
        self.requested: signal.Signals | None = None
        self._owner = os.getpid()
        follower = os.environ.get("RANK", "0").strip() not in ("", "0")
        self._level = logging.INFO if follower else logging.WARNING

    def is_set(self) -> bool:
        return self.requested is not None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.requested or signal.SIGTERM)

    def handle(self, signum: int, _frame: object) -> None:
        if os.getpid() != self._owner:
            return  # a forked worker: the job that owns it decides, and stops it
        sig = signal.Signals(signum)
        if not self.graceful or self.requested is not None:
            log.log(self._level, "%s: stopping now", sig.name)
            raise SystemExit(128 + signum)
        self.requested = sig
        log.log(self._level, "%s: finishing what is under way, then stopping", sig.name)

    @contextmanager
    def installed(self) -> Iterator[StopSignals]:
        """Handle SIGTERM and SIGINT in this (main) thread for the duration; restore the old handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self._owner = os.getpid()
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
