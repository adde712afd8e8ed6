"""Command-line conventions every job shares: flags generated from a job's config dataclass (so each
default lives in one place), help that shows defaults, the log format flag, and one way to end the
process with the documented exit code."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import logging
import os
import sys
import traceback
import types
import typing
from collections.abc import Callable
from typing import Any, NoReturn

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


def option(default: Any, meaning: str, flag: str = "", *, exclusive: bool = False, **argparse_kw: Any) -> Any:
    """A config field that is also a flag: its default (here only), its help line, the flag when it is
    not ``--field-name`` (``--no-x`` for a switch that turns a default-on field off), ``exclusive``
    for one of the job's required either-or flags, and argparse's own choices, metavar, required."""
    metadata = {"help": meaning, "flag": flag, "exclusive": exclusive, "argparse": argparse_kw}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a flag for each ``option`` field of the dataclass ``cls``, in field order. How the flag reads
    a value follows the field's type: int and float parse as such, a list takes one or more values,
    a bool is a switch (``--x`` sets it, ``--no-x`` clears it) or, when it may be None (chosen at run
    time), both (``--x``/``--no-x``). A flag not given whose default is empty text reads as None:
    ``given`` leaves such fields at their default."""
    hints = typing.get_type_hints(cls)
    group = None
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kw: dict[str, Any] = dict(f.metadata["argparse"])
        hint = hints[f.name]
        optional = isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)
        kinds = set(typing.get_args(hint)) - {type(None)} if optional else {hint}
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if bool in kinds:
            kw["action"] = (argparse.BooleanOptionalAction if optional
                            else "store_false" if default else "store_true")
        elif int in kinds or float in kinds:
            kw["type"] = int if int in kinds else float
        elif any(typing.get_origin(k) is list for k in kinds):
            kw["nargs"] = "+"
        if default != "" and not kw.get("required"):  # an empty text is None: no default to show
            kw["default"] = default
        flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
        target = parser
        if f.metadata["exclusive"]:
            group = group or parser.add_mutually_exclusive_group(required=True)
            target = group
        target.add_argument(flag, dest=f.name, help=f.metadata["help"], **kw)


def given(args: argparse.Namespace, *leave_out: str) -> dict[str, Any]:
    """The parsed options that have a value, but those named in ``leave_out``."""
    return {k: v for k, v in vars(args).items() if v is not None and k not in leave_out}


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
