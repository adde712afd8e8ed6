"""Command-line conventions every job shares: help that shows defaults, and the log format flag."""

from __future__ import annotations

import argparse
import os

LOG_FORMATS = ("text", "json")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (no reflowing), and each flag's default in its help, unless
    the help already says it or there is none to say (a switch, or a default chosen at run time)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
        return f"{text} (default: %(default)s)" if shown and action.option_strings else text


def add_logging_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("CUT_LOG_FORMAT", "text"),
        help="text, or json: one JSON object per line (also CUT_LOG_FORMAT=json)",
    )
