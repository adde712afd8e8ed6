"""Benchmarks measure in fresh processes; each child prints its result as the last line of its output."""

from __future__ import annotations

import json
import subprocess
from typing import Any


def run_json(cmd: list[str], env: dict[str, str] | None = None) -> Any:
    """Run ``cmd`` and return the JSON value on the last line of its stdout; a child that fails is a
    RuntimeError carrying the end of its stderr."""
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
