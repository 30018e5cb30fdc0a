"""Model and engine configuration, validated once when a model folder is opened."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pdserve.api.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a Hugging Face `config.json` that the Llama family needs."""

    path: Path
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    eos_token_ids: tuple[int, ...]
    dtype: str

    @classmethod
    def from_model_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        raw = _read_json(path / "config.json", required=True)
        generation = _read_json(path / "generation_config.json", required=False)

        def need(key: str) -> Any:
            if key not in raw:
                raise ModelLoadError(f"config.json: missing key '{key}'")
            return raw[key]

        architectures = need("architectures")
        arch = architectures[0] if isinstance(architectures, list) and architectures else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"config.json: architectures {architectures!r} is not one of "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelLoadError(f"config.json: hidden_act {raw['hidden_act']!r} is not 'silu'")
        if raw.get("mlp_bias"):
            raise ModelLoadError("config.json: mlp_bias=true is not supported")
        _refuse_sliding_window(raw)

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ModelLoadError(
                "config.json: num_attention_heads must be a multiple of num_key_value_heads"
            )
        head_dim = int(raw.get("head_dim") or hidden // num_heads)
        rope_theta, rope_scaling = _rope(raw)
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            path=path,
            architecture=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(need("max_position_embeddings")),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or bool(raw.get("attention_bias", False)),
            eos_token_ids=eos_ids,
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        )


@dataclass(frozen=True)
class EngineConfig:
    """How one engine instance runs its model.

    `num_blocks=None` sizes the KV pool as `kv_memory_fraction` of the device's memory (GPU
    memory on CUDA, RAM on CPU). `max_num_batched_tokens` is the
    token budget of one step (decode tokens plus prefill chunks). `enable_prefix_cache=False`
    computes every prompt from scratch (the baseline that cache hits must equal).
    `cuda_graphs` replays decode-only steps from captured CUDA graphs on CUDA (off to debug;
    ignored on CPU).
    """

    model: str
    dtype: str = "auto"
    device: str = "cpu"
    block_size: int = 16
    num_blocks: int | None = None
    kv_memory_fraction: float = 0.05
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    enable_prefix_cache: bool = True
    cuda_graphs: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError("num_blocks must be >= 1")


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name} not found in model folder {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path.name} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name} must hold a JSON object")
    return data


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Reads both layouts: `rope_theta` + `rope_scaling` (transformers 4) and
    `rope_parameters` (transformers 5)."""
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or params
    theta = float(raw.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"config.json: rope_scaling.rope_type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if rope_type == "default":
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    scaling["rope_type"] = rope_type
    return theta, scaling


def _refuse_sliding_window(raw: dict[str, Any]) -> None:
    window = raw.get("sliding_window")
    if window is None:
        return
    active = raw.get("use_sliding_window", raw.get("model_type") == "mistral")
    if active and int(window) < int(raw.get("max_position_embeddings", 0)):
        raise ModelLoadError(
            f"config.json: sliding_window={window} is active; pdserve serves full attention only"
        )
