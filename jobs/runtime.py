"""Process setup the jobs share: the torchrun/Kubernetes environment, device, code version."""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_int(*names: str, default: int) -> int:
    """The first of the environment variables ``names`` that is set, as an int; else ``default``."""
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    CPU limit), which os.cpu_count() ignores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def default_loader_workers(device: torch.device) -> int:
    """DataLoader processes per training rank: none on CPU (the step's threads use every core, and a
    crop's decoding costs milliseconds beside a step of seconds), else up to 4 (the official
    --num_threads) as the host's usable cores, shared by its ranks (LOCAL_WORLD_SIZE), allow."""
    if device.type == "cpu":
        return 0
    per_rank = available_cores() // max(1, env_int("LOCAL_WORLD_SIZE", default=1))
    return max(1, min(4, per_rank - 1))


def available_memory() -> int:
    """Bytes of memory this process may use: the machine's, capped by a cgroup v2 memory limit (a
    container's), which the machine's page count ignores."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            memory = min(memory, int(limit))
    except (OSError, ValueError):
        pass
    return memory


#: glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest mmap threshold glibc accepts on 64-bit machines (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 << 20


def reuse_freed_memory(keep: int | None = None) -> bool:
    """Let freed host memory serve the next allocation instead of going back to the kernel (glibc).

    glibc maps blocks above its mmap threshold (128 KiB, raised only as such blocks are freed)
    afresh and unmaps them when freed, and trims the heap's free top above 128 KiB: a network's
    activations, allocated anew at every forward, then cost a page fault per 4 KiB page each time
    (measured: 35,000-60,000 minor faults and 10-15% of a 256x256 generator forward on 2 cores;
    down to a few thousand with this). The mmap threshold goes to its 32 MiB maximum (larger blocks
    are still mapped and returned) and up to ``keep`` bytes of free heap stay in the process (by
    default 1 GiB, or an eighth of the memory this process may use where that is less, so that a
    small container's limit is not spent on kept free memory).
    Left alone where the user set either threshold (``MALLOC_MMAP_THRESHOLD_``,
    ``MALLOC_TRIM_THRESHOLD_`` or their ``GLIBC_TUNABLES``) or where the C library is not glibc;
    returns whether it applied.
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(f"MALLOC_{name.upper()}_" in os.environ or f"glibc.malloc.{name}" in tunables
           for name in ("mmap_threshold", "trim_threshold")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
    except (OSError, AttributeError):
        return False
    if keep is None:
        keep = min(1 << 30, available_memory() // 8)
    mapped = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(mapped and libc.mallopt(_M_TRIM_THRESHOLD, keep))


def init_runtime(device: str = "auto") -> Runtime:
    """Rank and device from the environment torchrun (or a PyTorchJob/JobSet) sets; joins the group.

    Backend nccl on CUDA, gloo on CPU; one CUDA device per LOCAL_RANK.
    """
    rank = env_int("RANK", default=0)
    world = env_int("WORLD_SIZE", default=1)
    local_rank = env_int("LOCAL_RANK", default=0)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            store=_attempt_store(rank, world),
            rank=rank,
            world_size=world,
            device_id=dev if use_cuda else None,
        )
    return Runtime(rank, world, local_rank, dev)


def _attempt_store(rank: int, world: int) -> dist.Store:
    """The rendezvous store of MASTER_ADDR:MASTER_PORT, with keys private to this restart attempt.

    Under torchrun the store outlives worker restarts (``--max-restarts``); without a per-attempt
    prefix, restarted ranks can read the dead ranks' addresses and fail to connect.
    """
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ.get("MASTER_PORT", "29500")),
        world,
        is_master=rank == 0 and not agent_hosts_store,
        timeout=timedelta(minutes=30),
    )
    return dist.PrefixStore(
        f"cut-pipeline/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


def shutdown(runtime: Runtime, wait_for_peers: bool = False) -> None:
    """Leave the process group. ``wait_for_peers`` (after a clean end of every rank's work) first
    meets the other ranks at a barrier, so that no rank tears down its connections while a peer's
    last collective or its teardown still uses them (a gloo peer then aborts the process)."""
    if runtime.distributed and dist.is_initialized():
        if wait_for_peers:
            try:
                dist.barrier()
            except RuntimeError as exc:  # a peer is gone already: nothing left to wait for
                log.warning("ranks did not meet before leaving the process group: %s", exc)
        dist.destroy_process_group()


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout."""
    try:
        version = metadata.version("cut-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    root = Path(__file__).resolve().parent.parent
    if (root / ".git").exists():
        try:
            sha = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            sha = ""
        if sha:
            version += f"+g{sha}"
    return version
