"""Random-weight Llama models of named shapes, so a benchmark needs no download."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool


SHAPES = {
    "llama-1b": Shape(16, 2048, 8192, 32, 8, 128256, True),  # Llama-3.2-1B
    "llama-77m": Shape(12, 768, 2048, 12, 4, 1000, False),
    "tiny": Shape(4, 256, 688, 4, 2, 1000, False),
}


def build_random_model(name: str, out_dir: Path, dtype: torch.dtype, device: str) -> Path:
    """Writes a random Llama of shape `name` to `out_dir`, built directly on `device` (a few
    seconds for the 1B shape on a GPU). No tokenizer: prompts are token ids."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[name]
    cfg = LlamaConfig(
        num_hidden_layers=s.layers,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        vocab_size=s.vocab,
        tie_word_embeddings=s.tied,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out_dir)
    return out_dir
