"""`pip install pdserve` (a wheel built from this checkout, not editable) then `pdserve serve`
in an empty folder: serves the tiny model, answers `pdserve status`, stops on Ctrl-C.

The new venv gets only the wheel; its dependencies come from the test's own environment through
a .pth file, so the test needs no network."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv holding pdserve from a wheel."""
    tmp = tmp_path_factory.mktemp("wheel")
    build = _run(sys.executable, "-m", "pip", "wheel", "--no-deps", str(ROOT), "-w", str(tmp))
    assert build.returncode == 0, build.stderr
    assert "Warning" not in build.stderr, build.stderr
    (wheel,) = tmp.glob("pdserve-*.whl")
    venv = tmp / "venv"
    assert _run(sys.executable, "-m", "venv", "--without-pip", str(venv)).returncode == 0
    python = venv / "bin" / "python"
    site = _run(str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    Path(site.stdout.strip(), "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = _run(
        sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", str(wheel)
    )
    assert install.returncode == 0, install.stderr
    return venv / "bin"


def test_installed_wheel_serves_from_an_empty_folder_and_stops_on_ctrl_c(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PDSERVE_MODELS")}
    env.update(PYTHONUNBUFFERED="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen(
        [str(installed / "pdserve"), "serve", "--listen", "127.0.0.1:0"],
        cwd=empty,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        seen, target = [], None
        deadline = time.monotonic() + 180
        while target is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
            seen.append(line)
            m = re.search(r"serving (\S+) on (\S+:\d+)", line)
            if m:
                model, target = m.groups()
        assert target, "serve never became ready:\n" + "".join(seen[-30:])
        assert model.startswith(str(empty / ".models")), model
        status = _run(str(installed / "pdserve"), "status", "--server", target, cwd=empty, env=env)
        assert status.returncode == 0 and "serving" in status.stdout, status.stdout + status.stderr
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
