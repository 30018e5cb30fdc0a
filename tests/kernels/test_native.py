"""Building the CPU engine's C kernels: cached per source, compiler and CPU; optional."""

from __future__ import annotations

import shutil

import pytest

from pdserve.kernels import native

needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """`native.load` with an empty cache directory and no library loaded yet."""
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    native.load.cache_clear()
    yield native.load
    native.load.cache_clear()


@needs_cc
def test_a_kernel_is_built_once_into_the_cache_and_then_reused(fresh_load, tmp_path):
    assert fresh_load("dense_decode_attention") is not None
    (built,) = (tmp_path / "native").glob("dense_decode_attention-*.so")
    mtime = built.stat().st_mtime_ns
    assert native._build("dense_decode_attention", shutil.which("cc")) == built
    assert built.stat().st_mtime_ns == mtime
    assert list((tmp_path / "native").iterdir()) == [built]  # no temporary files left


def test_native_kernels_can_be_turned_off(fresh_load, monkeypatch):
    monkeypatch.setenv("PDSERVE_NATIVE_KERNELS", "0")
    assert fresh_load("dense_decode_attention") is None


def test_a_compiler_that_fails_leaves_the_torch_path(fresh_load, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", shutil.which("false") or "/bin/false")
    assert fresh_load("dense_decode_attention") is None
    assert "could not build the native dense_decode_attention kernel" in caplog.text
    assert not list((tmp_path / "native").glob("*.so"))
