"""Command-line conventions every job shares: help that shows defaults, the log format flag, and one
way to end the process with the documented exit code."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from pipeline.storage import StorageUnreachableError, unreachable_endpoint

log = logging.getLogger("jobs")

LOG_FORMATS = ("text", "json")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (no reflowing), and each flag's default in its help, unless
    the help already says it or there is none to say (a default chosen at run time, or a switch: a
    ``--no-x`` switch's stored True would read as if the switch were on, so its help says the
    behaviour's default in words)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        switch = action.nargs == 0
        unsaid = action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
        shown = unsaid and not switch
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("CUT_LOG_FORMAT", "text"),
        help="text, or json: one JSON object per line (also CUT_LOG_FORMAT=json)",
    )


def run_job(main: Callable[[], int]) -> NoReturn:
    """Run a job's ``main`` and end the process with its exit code, the same code on every run.

    A store that cannot be reached (after pipeline.storage's retries) ends in one line naming the URL
    and exit 1, wherever in the job it happened; any other uncaught error prints its traceback and
    exits 1, as Python would.
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse's 2, a second signal's 130 or 143
        code = _system_exit_code(exc)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        endpoint = unreachable_endpoint(exc)
        if endpoint is None:
            traceback.print_exc()
        elif isinstance(exc, StorageUnreachableError):  # storage.retry's: names the URL and endpoint
            log.error("%s", exc)
        else:  # a read outside storage.retry (a stream, a library's own request)
            log.error("storage unreachable (%s): %s", endpoint, " ".join(str(exc).split()))
        code = 1
    end_process(code)


def _system_exit_code(exc: SystemExit) -> int:
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)  # sys.exit("message"), as Python reports it
    return 1


def end_process(code: int) -> NoReturn:
    """Flush the logs and streams, run the atexit handlers (multiprocessing's children, ...), then
    leave with ``code`` without the interpreter's teardown.

    Why: the refusal of jobs.infer (exit 2) ended in SIGABRT, exit 134, "terminate called without an
    active exception", in about half the runs: native libraries' thread pools (Arrow's, as
    pipeline.manifest notes) are C++ std::thread objects that static destructors at exit() destroy
    while still joinable. Nothing a job can do from Python stops them first, and a Kubernetes Job
    that reads exit codes must see the code the job chose. Every file a job writes is closed (and
    atomically in place) before its main returns, so nothing is lost by skipping the teardown.
    """
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
            stream.flush()
    os._exit(code)
