"""`pdserve serve` as an operator runs it: a foreground process without torch, controlled by
`pdserve status` / `pdserve generate --server`, with its HTTP door on `--openai-listen`, stopped
by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "pdserve.cluster.cli"]


def _wait_for_address(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        m = re.search(r"serving .* on (\S+:\d+)", line)
        if m:
            return m.group(1)
    raise AssertionError("serve never became ready:\n" + "".join(seen[-30:]))


def test_serve_runs_torch_free_answers_the_cli_and_stops_on_sigterm(tiny_llama_dir, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(tiny_llama_dir),
                "kv_cache": {"num_blocks": 64},
                "router": {"listen": "127.0.0.1:0"},
            }
        )
    )
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*CLI, "serve", "--config", str(config), "--openai-listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        target = _wait_for_address(proc)
        http = re.search(r"OpenAI API and /metrics on (http://\S+)", proc.stdout.readline())
        assert http, "serve --openai-listen did not say where the HTTP door is"
        with urllib.request.urlopen(http.group(1) + "/v1/models", timeout=30) as models:
            assert json.loads(models.read())["data"][0]["id"] == tiny_llama_dir.name
        with open(f"/proc/{proc.pid}/maps") as maps:
            assert "libtorch" not in maps.read(), "the router process loaded torch"

        status = subprocess.run(
            [*CLI, "status", "--server", target],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "prefill-0" in status.stdout and "decode-0" in status.stdout

        gen = subprocess.run(
            [
                *CLI,
                "generate",
                "--server",
                target,
                "--max-tokens",
                "5",
                "--ignore-eos",
                "--json",
                "The river",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert gen.returncode == 0, gen.stderr
        result = json.loads(gen.stdout.strip().splitlines()[-1])
        assert len(result["token_ids"]) == 5 and result["finish_reason"] == "length"
        assert result["prompt_token_ids"] and "ttft_s" in result["timings"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0
    down = subprocess.run(
        [*CLI, "status", "--server", target], capture_output=True, env=env, timeout=60
    )
    assert down.returncode != 0


def test_ctrl_c_while_workers_load_stops_serve_at_once(tiny_llama_dir, tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_llama_dir)}))
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*CLI, "serve", "--config", str(config), "--prefill-workers", "3", "--decode-workers", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        while "starting Ray" not in (line := proc.stdout.readline()):
            assert line, "serve ended before starting Ray"
        time.sleep(4)  # Ray is up; six workers are still importing torch on two cores
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        assert proc.wait(timeout=30) == 130
        assert time.monotonic() - stopped < 15
        assert "serving" not in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
