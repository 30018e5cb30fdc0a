"""Checks of a cluster config that run before Ray starts, so that a bad config costs one line
naming the problem instead of a traceback per worker, or a wait for resources that never come."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from pdserve.api.errors import ModelLoadError
from pdserve.api.tokenizer import Tokenizer
from pdserve.cluster.config import ClusterConfig, ConfigError
from pdserve.engine.config import ModelConfig


def check_model(model: str) -> None:
    """The model folder is readable, its architecture supported, its tokenizer loads and it
    holds safetensors weights."""
    folder = Path(model)
    try:
        if not folder.is_dir():
            raise ModelLoadError(f"{folder} is not a folder")
        ModelConfig.from_model_dir(folder)
        Tokenizer.from_model_dir(folder)
        if not any(folder.glob("*.safetensors")):
            raise ModelLoadError(f"no *.safetensors weights in {folder}")
    except ModelLoadError as e:
        raise ConfigError(f"model: {e}") from None


def needed_resources(config: ClusterConfig) -> dict[str, float]:
    """What the workers ask Ray for: their role's resource, and one GPU per rank on CUDA."""
    ranks = {"prefill": config.prefill.workers * config.prefill.tp}
    ranks["decode"] = config.decode.workers * config.decode.tp
    if config.device.startswith("cuda"):
        ranks["GPU"] = ranks["prefill"] + ranks["decode"]
    return ranks


def check_resources(config: ClusterConfig, available: Mapping[str, float], where: str) -> None:
    """Refuses a config whose workers would wait forever for resources `where` lacks."""
    for name, need in needed_resources(config).items():
        have = available.get(name, 0)
        if have < need:
            key = f"device: {config.device}" if name == "GPU" else f"{name}.workers"
            raise ConfigError(f"{key}: the workers need {need:g} {name} but {where} has {have:g}")


def local_gpu_count() -> int:
    """The NVIDIA GPUs this machine shows to a process, as Ray counts them at start."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines())
