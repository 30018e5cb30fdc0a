from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

import pdserve.kernels as kernels
from pdserve.kernels import rope_cos_sin_cache

pytestmark = pytest.mark.kernels

# op -> (its module, example arguments); the module holds <op>_ref and <op>_triton.
OPS = {
    "write_kv_cache": (
        "kv_cache",
        lambda: (
            torch.randn(2, 1, 16),
            torch.randn(2, 1, 16),
            torch.zeros(2, 1, 16, 16),
            torch.zeros(2, 1, 16, 16),
            torch.tensor([0, 17]),
        ),
    ),
    "prefill_attention": (
        "prefill_attention",
        lambda: (
            torch.randn(3, 2, 16),
            torch.randn(2, 1, 16, 16),
            torch.randn(2, 1, 16, 16),
            torch.tensor([[0]], dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32),
            torch.tensor([3], dtype=torch.int32),
            0.25,
        ),
    ),
    "decode_attention": (
        "decode_attention",
        lambda: (
            torch.randn(1, 2, 16),
            torch.randn(2, 1, 16, 16),
            torch.randn(2, 1, 16, 16),
            torch.tensor([[0]], dtype=torch.int32),
            torch.tensor([3], dtype=torch.int32),
            0.25,
        ),
    ),
    "rms_norm": ("rms_norm", lambda: (torch.randn(2, 16), torch.ones(16), 1e-6)),
    "rotary_embedding": (
        "rotary",
        lambda: (
            torch.randn(2, 2, 16),
            torch.randn(2, 1, 16),
            torch.tensor([0, 1]),
            rope_cos_sin_cache(16, 4, 10000.0, None),
        ),
    ),
}


def test_use_triton_only_on_cuda_unless_forced(monkeypatch):
    monkeypatch.delenv("PDSERVE_TRITON", raising=False)
    assert not kernels.use_triton(torch.zeros(1))
    monkeypatch.setenv("PDSERVE_TRITON", "1")
    assert kernels.use_triton(torch.zeros(1))


@pytest.mark.parametrize("forced", [False, True], ids=["cpu", "forced"])
@pytest.mark.parametrize("name", OPS)
def test_op_runs_reference_on_cpu_and_triton_when_forced(monkeypatch, name, forced):
    module_name, make_args = OPS[name]
    module = importlib.import_module(f"pdserve.kernels.{module_name}")
    called = []
    # A native CPU kernel, where an op has one, is tried first and returns None when it does
    # not apply; the stand-in records the try and declines.
    paths = [p for p in ("ref", "triton", "native") if hasattr(module, f"{name}_{p}")]
    for path in paths:
        monkeypatch.setattr(module, f"{name}_{path}", lambda *a, path=path: called.append(path))
    if forced:
        monkeypatch.setenv("PDSERVE_TRITON", "1")
    else:
        monkeypatch.delenv("PDSERVE_TRITON", raising=False)
    getattr(kernels, name)(*make_args())
    cpu = ["native", "ref"] if "native" in paths else ["ref"]
    assert called == (["triton"] if forced else cpu)


def test_package_imports_and_runs_references_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from pdserve.kernels import rms_norm\n"
        "print(rms_norm(torch.ones(2, 8), torch.ones(8), 1e-6).sum().item())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(16.0, rel=1e-5)
