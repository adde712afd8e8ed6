"""A job's `main(argv)` run inside the test process, answered like `subprocess.run` would answer.

Starting `python -m jobs.X` costs seconds of imports (torch, pyarrow) per run; a test of what a job
decides (exit code, messages, files written) needs no process of its own. Tests of process-level
behaviour (exit codes as the shell sees them, signals, kills, torchrun, concurrent runs) keep
starting real processes.
"""

from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_main(main: Callable[[list[str]], int], *args: str, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """``main(list(args))`` with stdout and stderr captured, ``env`` set, one torch thread (the job
    processes of the tests ran with OMP_NUM_THREADS=1: these tiny networks gain nothing from a second
    thread, and an oversubscribed OpenMP pool on a shared machine makes them many times slower), and
    the job's global changes undone afterwards (root log handlers, torch's thread count, the working
    folder). argparse's SystemExit becomes the return code as in `python -m`; any other exception
    propagates (a test that meets one has found a bug, as a traceback in a process's stderr would
    show)."""
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level, threads = root.handlers[:], root.level, torch.get_num_threads()
    captured = contextlib.redirect_stdout(out), contextlib.redirect_stderr(err)
    with pytest.MonkeyPatch.context() as patch, captured[0], captured[1]:
        patch.chdir(ROOT)  # as the subprocesses run: relative paths (configs/...) resolve from the repo
        for name, value in {"OMP_NUM_THREADS": "1", **(env or {})}.items():
            patch.setenv(name, value)
        torch.set_num_threads(1)
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's exit 2 (or 0 for --help)
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        finally:
            for handler in root.handlers:
                if handler not in handlers:
                    handler.close()
            root.handlers[:] = handlers
            root.setLevel(level)
            torch.set_num_threads(threads)
    return subprocess.CompletedProcess([sys.executable, *args], code, out.getvalue(), err.getvalue())

