"""Native CPU kernels (``cut/csrc``), compiled with the machine's C++ compiler on first use.

The library is built once per machine, source and torch version (about 20 s), into a cache
directory (``$CUT_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/cut-pipeline`` or
``~/.cache/cut-pipeline``, else the temp directory: the one build artefact ``cut/`` writes) and
loaded as the torch operators ``torch.ops.cut_native.*``. Concurrent processes (DDP ranks) may
build at once: each writes its own file and renames it into place. Where there is no compiler, or
``CUT_NATIVE=0``, :func:`available` is False and callers take their pure-PyTorch path instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))


def _flags() -> list[str]:
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _library_path(compiler: str) -> Path:
    key = hashlib.sha256()
    for part in (torch.__version__, platform.machine(), compiler, *_flags()):
        key.update(part.encode())
    for source in SOURCES:
        key.update(source.read_bytes())
    return _cache_dir() / f"cut_native-{key.hexdigest()[:16]}.so"


def _cache_dir() -> Path:
    """The first writable of $CUT_NATIVE_CACHE, the user's cache directory and the temp directory
    (a read-only home, as in many containers, must not cost the kernels).
    """
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


def _build(compiler: str, target: Path) -> None:
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    (lib_dir,) = cpp_extension.library_paths()[:1]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    cmd = [compiler, *_flags(), *includes, *map(str, SOURCES), "-o", tmp]
    cmd += [f"-L{lib_dir}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib_dir}"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling {', '.join(map(str, SOURCES))} failed:\n{e.stderr[-2000:]}") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.cache
def available() -> bool:
    """Whether the native kernels are loaded (building them if needed); False, with one warning
    saying why, where they cannot be built.
    """
    if os.environ.get("CUT_NATIVE", "1") == "0":
        return False
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no C++ compiler found: native CPU kernels off (slower CPU training, same math)")
        return False
    target = _library_path(compiler)
    try:
        if not target.exists():
            log.info("compiling native CPU kernels into %s (once per machine)", target)
            _build(compiler, target)
        torch.ops.load_library(str(target))
    except (OSError, RuntimeError) as e:
        log.warning("native CPU kernels unavailable, using the PyTorch path: %s", e)
        return False
    return True
