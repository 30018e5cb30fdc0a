"""C kernels for the CPU engine, compiled on first use with the machine's C compiler.

pdserve ships as pure Python; the few CPU kernels that plain torch runs far from the hardware's
limit are C sources in `csrc/`, built here for this CPU (`-march=native`) into a cache keyed
by the source, the compiler and the CPU, and loaded with ctypes. Builds are atomic (a temporary
file renamed into place), so workers starting together share one result. Without a compiler,
or with ``PDSERVE_NATIVE_KERNELS=0``, `load` returns None and callers use their torch path.

NOTE: OpenMP comes from the libgomp torch has already loaded (same soname), so a kernel's
threads are torch's own pool; callers pass ``torch.get_num_threads()`` because OpenMP's thread
count is per calling thread. No ``-ffast-math``: with ``-shared`` GCC < 13 links crtfastmath,
which flushes denormals for the whole process; the reassociation flags below are enough to
vectorize the reductions.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
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


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The library built from ``csrc/<name>.c``, or None where it cannot be built here."""
    if os.environ.get("PDSERVE_NATIVE_KERNELS") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: the CPU engine runs %s in plain torch", name)
        return None
    try:
        return ctypes.CDLL(str(_build(name, compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("could not build the native %s kernel (%s): using plain torch", name, e)
        return None


def _build(name: str, compiler: str) -> Path:
    source = (_CSRC / f"{name}.c").read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, check=True, timeout=30
    ).stdout
    key = hashlib.sha256(
        b"\0".join([source, version, " ".join(_FLAGS).encode(), _cpu_id().encode()])
    ).hexdigest()[:16]
    out = cache_dir() / "native" / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_FLAGS, str(_CSRC / f"{name}.c"), "-o", tmp, "-lm"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "error" in line]
            raise OSError((errors or [f"{compiler} exited with {done.returncode}"])[0])
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


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
