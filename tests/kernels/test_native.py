"""Building the CPU engine's C kernels: cached per source, compiler and CPU; optional."""

from __future__ import annotations

import pytest
from native_helpers import needs_cc

from pdserve.kernels import native


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
    assert native._build("dense_decode_attention", native.compiler()) == built
    assert built.stat().st_mtime_ns == mtime
    assert list((tmp_path / "native").iterdir()) == [built]  # no temporary files left


def test_native_kernels_can_be_turned_off(fresh_load, monkeypatch):
    monkeypatch.setenv("PDSERVE_NATIVE_KERNELS", "0")
    assert fresh_load("dense_decode_attention") is None


def test_a_compiler_that_fails_leaves_the_torch_path_and_no_files(
    fresh_load, monkeypatch, tmp_path, caplog
):
    # A compiler that answers --version and then fails to compile, as a broken toolchain does.
    fake = tmp_path / "fake-cc"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = --version ] && { echo fake-cc 1.0; exit 0; }\n'
        'echo "fatal error: no such header" >&2\nexit 1\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert fresh_load("dense_decode_attention") is None
    assert "could not build the native dense_decode_attention kernel" in caplog.text
    assert "no such header" in caplog.text
    assert list((tmp_path / "native").iterdir()) == []  # the temporary output is gone


def test_cc_may_carry_arguments(monkeypatch):
    monkeypatch.setenv("CC", "ccache gcc -m64")
    assert native.compiler() == ["ccache", "gcc", "-m64"]


@needs_cc
def test_every_kernel_source_builds_at_once(fresh_load, tmp_path):
    native.load_all()
    built = sorted(p.name.split("-")[0] for p in (tmp_path / "native").glob("*.so"))
    sources = sorted(p.stem for p in (native._CSRC).glob("*.c"))
    assert built == sources and len(sources) == 6
