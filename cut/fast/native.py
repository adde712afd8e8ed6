"""Native CPU kernels (``cut/fast/csrc``), built on first use by torch's own extension builder.

``torch.utils.cpp_extension.load`` compiles them once per checkout, source and torch version (about
20 s) into a build directory under the user's cache (``$CUT_NATIVE_CACHE``, else
``$XDG_CACHE_HOME/cut-pipeline`` or ``~/.cache/cut-pipeline``, else the temp directory: a read-only
home, as in many containers, must not cost the kernels) and loads them as the torch operators
``torch.ops.cut_native.*``; concurrent processes (DDP ranks) wait on its lock for one build (a lock
older than ``STALE_LOCK_SECONDS``, left by a killed build, is removed first: torch would wait on it
forever). It needs a C++ compiler and ninja. Where either is missing, or with ``CUT_NATIVE=0``,
:func:`available` is False (with one warning saying why) and every convolution is torch's own.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))

#: What the kernels are compiled with; -mfma lets the compiler fuse multiply-adds, so results
#: depend on these flags: change them only with the numerics tests.
CFLAGS = ["-O3", "-fopenmp", "-w"]  # with torch's own -std=c++20 -fPIC
AVX2_CFLAGS = ["-mavx2", "-mfma"]

#: A build takes seconds to a few minutes; a lock this old belongs to a build that was killed.
STALE_LOCK_SECONDS = 900


def _cflags() -> list[str]:
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    return CFLAGS + (AVX2_CFLAGS if avx2 else [])


def _cache_dir() -> Path:
    """The first writable of $CUT_NATIVE_CACHE, the user's cache directory and the temp directory."""
    explicit = os.environ.get("CUT_NATIVE_CACHE")
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "cut-pipeline")
    fallback = Path(tempfile.gettempdir(), f"cut-pipeline-{os.getuid()}")
    for candidate in ([Path(explicit)] if explicit else [home_cache, fallback]):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(candidate, os.W_OK):
            return candidate
    return fallback


def _remove_stale_lock(build_dir: Path) -> None:
    lock = build_dir / "lock"  # torch's FileBaton
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def _missing_tool() -> str | None:
    """What the build lacks (a compiler, ninja), or None."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler})"
    from torch.utils import cpp_extension  # (with setuptools: a fifth of a second, paid at first use only)

    if not cpp_extension.is_ninja_available():
        return "no ninja"
    return None


@functools.cache
def available() -> bool:
    """Whether the native kernels are loaded (building them if needed); False, with one warning
    saying why, where they cannot be built.
    """
    if os.environ.get("CUT_NATIVE", "1") == "0":
        return False
    missing = _missing_tool()
    if missing is not None:
        log.warning("%s: native CPU kernels off (CPU training and inference slower, same math)", missing)
        return False
    # One build directory per checkout: torch's builder writes the sources' absolute paths into it,
    # so two checkouts sharing one directory would rebuild (about 20 s) each time the other ran.
    checkout = hashlib.sha256(str(SOURCES[0].parent.resolve()).encode()).hexdigest()[:12]
    build_dir = _cache_dir() / f"native-torch{torch.__version__}-{platform.machine()}-{checkout}"
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_lock(build_dir)
        log.info("loading native CPU kernels from %s (built there once per checkout)", build_dir)
        from torch.utils import cpp_extension

        cpp_extension.load(
            "cut_native", [str(s) for s in SOURCES], extra_cflags=_cflags(), extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir), is_python_module=False, verbose=False,
        )
    except (OSError, RuntimeError) as e:
        log.warning("native CPU kernels unavailable, using the PyTorch path: %s", e)
        return False
    return True
