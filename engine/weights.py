"""Reading Hugging Face safetensors checkpoints: one file, or shards listed in an index."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from pdserve.api.errors import ModelLoadError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{INDEX_FILE}: malformed, needs a 'weight_map' ({e})") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / SINGLE_FILE).is_file():
        files = [model_dir / SINGLE_FILE]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise ModelLoadError(f"{SINGLE_FILE} not found in model folder {model_dir}")
    for f in files:
        if not f.is_file():
            raise ModelLoadError(f"{f.name} (listed in {INDEX_FILE}) not found in {model_dir}")
    return files


class LazyTensor:
    """A checkpoint tensor that reads from disk only the rows and columns asked of it, so a
    tensor-parallel rank reads only its shard. Valid while `iter_weights` is on its file."""

    def __init__(self, name: str, source) -> None:
        self.name = name
        self._source = source  # a safetensors slice
        self.shape = tuple(source.get_shape())

    def read(self, rows: range | None = None, cols: range | None = None) -> torch.Tensor:
        r = slice(None) if rows is None else slice(rows.start, rows.stop)
        c = slice(None) if cols is None else slice(cols.start, cols.stop)
        try:
            return self._source[r] if len(self.shape) == 1 else self._source[r, c]
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"tensor '{self.name}': cannot read it ({e})") from e


def iter_weights(model_dir: Path) -> Iterator[LazyTensor]:
    """Yields every tensor in the checkpoint, unread, one file at a time."""
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield LazyTensor(name, f.get_slice(name))
        except Exception as e:  # safetensors raises its own error types for corrupt files
            if isinstance(e, ModelLoadError):
                raise
            raise ModelLoadError(f"{path.name}: cannot read safetensors file ({e})") from e
