"""Worker services run in the test process; put back what they set process-wide."""

from __future__ import annotations

import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_process_settings():
    """A service sets its process's torch threads and GIL switch interval."""
    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    yield
    torch.set_num_threads(threads)
    sys.setswitchinterval(interval)
