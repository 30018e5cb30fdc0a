"""A GGUF file of a Llama or Qwen2 model, written out as a Hugging Face folder the engine loads.

The `gguf` package reads the file and dequantizes every tensor to float32; transformers' GGUF
converters write `config.json` and the tokenizer (with its chat template). Both come with the
optional extra `pdserve[gguf]`. This module imports torch (through transformers), so the
torch-free router process runs it in a child process (`pdserve import-gguf`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pdserve.api.errors import ModelLoadError

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor names (llama.cpp's) -> Hugging Face names, per layer and for the whole model.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_MODEL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_EXTRA_HINT = "reading GGUF files needs the optional extra: pip install 'pdserve[gguf]'"


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Writes the Hugging Face folder of `gguf_file` to `out_dir` (replaced if present; written
    beside it first, so a folder that exists is always complete) and returns it."""
    try:
        from gguf import GGUFReader
        from safetensors.numpy import save_file
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    except ImportError as e:
        raise ModelLoadError(f"{_EXTRA_HINT} ({e})") from e
    src, out = Path(gguf_file).resolve(), Path(out_dir)
    try:
        reader = GGUFReader(src)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{src} is not a readable GGUF file: {e}") from e
    arch = reader.fields["general.architecture"].contents()
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{src.name}: architecture {arch!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    config = AutoConfig.from_pretrained(src.parent, gguf_file=src.name)
    config.architectures = [ARCHITECTURES[arch]]
    config.dtype = "float32"
    tensors = dict(_hf_tensors(reader, arch == "llama", config))
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)

    staging = out.with_name(f"{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    config.save_pretrained(staging)
    GenerationConfig.from_model_config(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    (staging / "source.json").write_text(json.dumps({"gguf": str(src)}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _hf_tensors(reader, unpermute_qk: bool, config) -> Iterator[tuple[str, np.ndarray]]:
    from gguf.quants import dequantize

    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        # NOTE: GGUF lists dimensions innermost first; Hugging Face outermost first.
        shape = tuple(int(d) for d in reversed(tensor.shape))
        weights = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        if unpermute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads
            if name.endswith("k_proj.weight"):
                heads = config.num_key_value_heads
            weights = _unpermute_rope(weights, heads)
        yield name, np.ascontiguousarray(weights)


def _hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
    if base in _MODEL_TENSORS:
        return f"{_MODEL_TENSORS[base]}.{kind}"
    raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in pdserve")


def _unpermute_rope(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each Llama q/k head from rotate-half pairs (HF) to
    interleaved pairs (GGML's rope); this undoes it."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )
