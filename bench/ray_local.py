"""A local Ray instance for benchmarks, started once and joined by the timed jobs (--ray-address).

    with local_ray(num_cpus=4, env=os.environ) as ray:
        run([..., "--ray-address", ray.address], env={**os.environ, **ray.env})

The instance lives in a helper process of its own (`python -m bench.ray_local --_serve N`) that
ray.init()s a head node on this machine, prints its GCS address, and shuts it down when its stdin
closes: its start-up is paid once, outside any timed run, and its processes end with the helper's, not
with the jobs that join it. The helper's environment is the one Ray's worker processes (the actors)
inherit. The instance takes a token of its own (Ray's token authentication, on by default for local
instances from Ray 2.59): ``ray.env`` holds what a joining process needs.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_MARK = "ray-address: "


@dataclass
class LocalRay:
    address: str  # the GCS address, for --ray-address / RAY_ADDRESS
    start_seconds: float  # what starting it took (charged to no job)
    env: dict[str, str]  # the variables a process that joins it needs


@contextlib.contextmanager
def local_ray(num_cpus: int, env: Mapping[str, str]) -> Iterator[LocalRay]:
    """Start the instance with ``num_cpus`` CPU slots, yield it, stop it."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    with tempfile.TemporaryDirectory(prefix="ray-") as temp_dir:
        start = time.perf_counter()
        helper = subprocess.Popen(
            [sys.executable, "-m", "bench.ray_local", "--_serve", str(num_cpus), "--_temp-dir", temp_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**env, **auth, "RAY_USAGE_STATS_ENABLED": "0"},  # no usage report from a benchmark
        )
        try:
            address = ""
            for line in helper.stdout:  # up to the marker line (Ray may print before it)
                if line.startswith(_MARK):
                    address = line[len(_MARK):].strip()
                    break
            if not address:
                raise RuntimeError(f"the local Ray instance did not start (exit {helper.wait()})")
            yield LocalRay(address, time.perf_counter() - start, auth)
        finally:
            helper.stdin.close()  # the helper shuts Ray down and exits
            try:
                helper.wait(timeout=60)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()


def _serve(num_cpus: int, temp_dir: str) -> None:
    import ray

    context = ray.init(num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                       logging_level="WARNING")
    print(_MARK + context.address_info["gcs_address"], flush=True)
    sys.stdin.read()  # until the benchmark closes it
    ray.shutdown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--_serve", type=int, required=True, help=argparse.SUPPRESS)
    p.add_argument("--_temp-dir", required=True, help=argparse.SUPPRESS)
    args = p.parse_args()
    _serve(args._serve, args._temp_dir)
