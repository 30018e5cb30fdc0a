"""Skips a test of the native CPU kernels on a machine that cannot build them."""

from __future__ import annotations

import pytest

from pdserve.kernels import native

needs_cc = pytest.mark.skipif(native.compiler() is None, reason="no C compiler")
