"""C kernels for the CPU engine, compiled on first use with the machine's C compiler.

pdserve ships as pure Python; the few CPU kernels that plain torch runs far from the hardware's
limit are C sources in `csrc/`, built here for this CPU (`-march=native`) into a cache keyed
by the source, the compiler and the CPU, and loaded with ctypes. Builds are atomic (a temporary
file renamed into place), so workers starting together share one result. Without a compiler,
or with ``PDSERVE_NATIVE_KERNELS=0``, `function` returns None and callers use their torch path.

NOTE: OpenMP is assumed to come from the ``libgomp.so.1`` torch has already loaded (the PyPI
wheels bundle it under that soname), so a kernel's threads are torch's own pool; a torch built
against another OpenMP runtime would give the kernels a second pool. Callers pass
``torch.get_num_threads()`` because OpenMP's thread count is per calling thread. No
``-ffast-math``: with ``-shared``, GCC < 13 links crtfastmath, which flushes denormals for the
whole process; the reassociation flags below are enough to vectorize the reductions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_FLAGS = [
    "-O3",
    "-march=native",
    "-fPIC",
    "-shared",
    "-fopenmp",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
]


def cache_dir() -> Path:
    if os.environ.get("PDSERVE_CACHE_DIR"):
        return Path(os.environ["PDSERVE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pdserve"


def compiler() -> list[str] | None:
    """``$CC`` (which may carry arguments, as ``ccache gcc``), else ``cc`` or ``gcc``."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def function(
    source: str, symbol: str, argtypes: list, restype: type | None
) -> ctypes._CFuncPtr | None:
    """``symbol`` of the library built from ``csrc/<source>.c``, typed, or None where that
    library cannot be built here."""
    lib = load(source)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def load_all() -> None:
    """Builds (or finds in the cache) every kernel in `csrc/` now, so a CPU engine pays for
    compiling when it starts, not in its first request's step."""
    for path in sorted(_CSRC.glob("*.c")):
        load(path.stem)


@functools.cache
def load(source: str) -> ctypes.CDLL | None:
    """The library built from ``csrc/<source>.c``, or None where it cannot be built here."""
    if os.environ.get("PDSERVE_NATIVE_KERNELS") == "0":
        return None
    cc = compiler()
    if cc is None:
        logger.warning("no C compiler found: the CPU engine runs %s in plain torch", source)
        return None
    try:
        return ctypes.CDLL(str(_build(source, cc)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        logger.warning("could not build the native %s kernel (%s): using plain torch", source, e)
        return None


def _build(source: str, cc: list[str]) -> Path:
    text = (_CSRC / f"{source}.c").read_bytes()
    key = hashlib.sha256(
        b"\0".join([text, _version(tuple(cc)), " ".join(_FLAGS).encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    out = cache_dir() / "native" / f"{source}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [*cc, *_FLAGS, str(_CSRC / f"{source}.c"), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise OSError(f"{shlex.join(cmd)} exited with {done.returncode}: {tail}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def _version(cc: tuple[str, ...]) -> bytes:
    """The compiler's own description of itself, once per process."""
    return subprocess.run([*cc, "--version"], capture_output=True, check=True, timeout=30).stdout


@functools.cache
def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    keep = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(
        sorted({line for line in lines if line.split(":")[0].strip() in keep})
    )
