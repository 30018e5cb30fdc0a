"""Shared fixtures: the environment every test process needs, and the tiny model folders.

The three model folders together cover what the fidelity tests must: GQA and MHA, head dim 64
and 80, tied and untied embeddings, q/k/v bias, and llama3 rope scaling.
"""

from __future__ import annotations

import os
import sys

import pytest

# Set before anything imports torch, Ray or tokenizers (see ../shared/PLATFORM.md): two torch
# processes with two threads each on two cores slow down 50-150x, and Ray must stay on loopback.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    # torch is imported by test modules during collection, before this runs; a test that imports
    # it later still gets one thread from OMP_NUM_THREADS.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _make(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs):
    from pdserve.cluster.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """The default tiny Llama: GQA (4 heads, 2 KV heads), head dim 64, untied embeddings."""
    return _make(tmp_path_factory, "tiny-llama", variant="llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory):
    """Qwen2: MHA (4 heads, 4 KV heads), head dim 80, q/k/v bias, tied embeddings."""
    return _make(
        tmp_path_factory,
        "tiny-qwen2",
        variant="qwen2",
        hidden_size=320,
        num_heads=4,
        num_kv_heads=4,
        head_dim=80,
    )


@pytest.fixture(scope="session")
def tiny_mqa_dir(tmp_path_factory):
    """One KV head for 4 query heads: at TP 2 both ranks hold (replicate) the KV head."""
    return _make(tmp_path_factory, "tiny-mqa", num_kv_heads=1)


@pytest.fixture(scope="session")
def tiny_llama3_rope_dir(tmp_path_factory):
    """The default tiny Llama with llama3 rope scaling (original context 256)."""
    return _make(tmp_path_factory, "tiny-llama3-rope", rope_scaling=LLAMA3_ROPE_SCALING)


def pytest_terminal_summary(terminalreporter) -> None:
    from fault_table import ROWS, format_table

    if ROWS:
        terminalreporter.write_sep("=", "fault injection")
        terminalreporter.write_line(format_table())
