"""Log setup for every job: text or JSON lines, and one rank's INFO under torchrun."""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone


class JsonLines(logging.Formatter):
    """One JSON object per record (time, level, logger, rank, message), for cluster log pipelines."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "rank": self.rank,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _not_connection_noise(record: logging.LogRecord) -> bool:
    """asyncio logs a request task that aiohttp abandoned on a dropped connection ("Task exception was
    never retrieved") with its traceback; the request itself failed and pipeline.storage retries it
    and says so in one line, so that traceback is dropped."""
    error = record.exc_info[1] if record.exc_info else None
    return not (record.name == "asyncio" and isinstance(error, OSError))


def setup_logging(rank: int, log_format: str = "text") -> None:
    """Log lines carry the rank. Under torchrun (RANK set) only rank 0 logs INFO; the other ranks log
    warnings and errors, unless CUT_LOG_ALL_RANKS=1. Independent workers (an Indexed Job's pods, each
    with its own log) all log INFO."""
    follower = os.environ.get("RANK", "0").strip() not in ("", "0")
    quiet = follower and os.environ.get("CUT_LOG_ALL_RANKS") != "1"
    handler = logging.StreamHandler()
    handler.addFilter(_not_connection_noise)
    if log_format == "json":
        handler.setFormatter(JsonLines(rank))
    else:
        text = f"%(asctime)s rank={rank} %(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(text))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, handlers=[handler], force=True)
