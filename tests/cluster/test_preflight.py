"""`pdserve serve` checks its config before Ray starts: one line naming the problem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from pdserve.cluster.config import ConfigError, config_from_dict
from pdserve.cluster.preflight import check_model, check_resources

CLI = [sys.executable, "-m", "pdserve.cluster.cli"]


def _serve(tmp_path, **config) -> subprocess.CompletedProcess:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [*CLI, "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_a_missing_model_folder_is_one_line_before_ray(tmp_path):
    start = time.monotonic()
    proc = _serve(tmp_path, model="no-such-model")
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == [f"pdserve serve: error: model: {tmp_path / 'no-such-model'} is not a folder"]
    assert "Ray" not in proc.stdout.split("starting Ray")[-1] and "Traceback" not in proc.stderr
    assert time.monotonic() - start < 30


def test_cuda_without_a_gpu_is_refused_instead_of_waiting(tmp_path, tiny_llama_dir):
    proc = _serve(tmp_path, model=str(tiny_llama_dir), device="cuda")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "pdserve serve: error: device: cuda: the workers need 2 GPU but this machine has 0"
    ]


@pytest.fixture
def gpt2_folder(tmp_path, tiny_llama_dir):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"]})
    )
    return folder


def test_an_unsupported_architecture_is_named(gpt2_folder):
    with pytest.raises(
        ConfigError, match=r"^model: config.json: architectures \['GPT2LMHeadModel'\]"
    ):
        check_model(str(gpt2_folder))


def test_a_folder_without_weights_is_named(tmp_path, tiny_llama_dir):
    folder = tmp_path / "noweights"
    shutil.copytree(tiny_llama_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(ConfigError, match="^model: no \\*.safetensors weights"):
        check_model(str(folder))


def test_a_joined_cluster_without_decode_nodes_is_refused():
    config = config_from_dict({"model": "m", "decode": {"workers": 2}})
    with pytest.raises(ConfigError, match="^decode.workers: the workers need 2 decode but the"):
        check_resources(config, {"prefill": 4.0, "decode": 1.0}, "the Ray cluster at auto")
    check_resources(config, {"prefill": 1.0, "decode": 2.0}, "the Ray cluster at auto")
