"""Write a small random-weight Hugging Face model folder for tests, demos and benchmarks.

The folder is laid out like a Hub checkpoint (config, safetensors weights, tokenizer files,
generation config), so the engine loads it through the same code path as a real model and
`transformers` can load it as the reference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from pdserve.cluster.corpus import corpus_lines

# The pre-tokenizer split patterns of Llama 3 and Qwen2 (Qwen2 splits digits one by one).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}"
    "{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class _Variant:
    architecture: str
    model_type: str
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    generation_eos: tuple[str, ...]
    chat_template: str
    split_pattern: str
    nfc: bool
    rms_norm_eps: float
    qkv_bias: bool
    tie_word_embeddings: bool


VARIANTS = {
    "llama": _Variant(
        architecture="LlamaForCausalLM",
        model_type="llama",
        special_tokens=(
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
        ),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        generation_eos=("<|end_of_text|>", "<|eot_id|>"),
        chat_template=LLAMA3_CHAT_TEMPLATE,
        split_pattern=LLAMA3_SPLIT,
        nfc=False,
        rms_norm_eps=1e-5,
        qkv_bias=False,
        tie_word_embeddings=False,
    ),
    "qwen2": _Variant(
        architecture="Qwen2ForCausalLM",
        model_type="qwen2",
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        generation_eos=("<|im_end|>", "<|endoftext|>"),
        chat_template=CHATML_TEMPLATE,
        split_pattern=QWEN2_SPLIT,
        nfc=True,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_word_embeddings=True,
    ),
}


def make_tiny_model(
    out_dir: str | Path,
    variant: str = "llama",
    *,
    num_layers: int = 4,
    hidden_size: int = 256,
    intermediate_size: int = 688,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 1000,
    max_position_embeddings: int = 2048,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
    rope_scaling: dict[str, Any] | None = None,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
) -> Path:
    """Write the model folder to `out_dir` (created if missing) and return its path.

    The same arguments always give byte-identical files.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    spec = VARIANTS[variant]
    if head_dim is None and hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    tied = spec.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = train_tokenizer(variant, vocab_size)
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {token: tokenizer.token_to_id(token) for token in spec.special_tokens}
    bos_id = ids[spec.bos_token] if spec.bos_token else ids[spec.generation_eos[-1]]
    eos_ids = [ids[token] for token in spec.generation_eos]

    config: dict[str, Any] = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": rope_theta,
        "tie_word_embeddings": tied,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids if len(eos_ids) > 1 else eos_ids[0],
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if spec.model_type == "llama":
        config.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        # As in released Qwen2 checkpoints: a window size is present but inactive.
        config.update(
            use_sliding_window=False,
            sliding_window=max_position_embeddings,
            max_window_layers=num_layers,
        )
    if head_dim is not None:
        config["head_dim"] = head_dim
    if rope_scaling is not None:
        config["rope_scaling"] = dict(rope_scaling)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_ids, "do_sample": False},
    )
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": spec.bos_token,
            "eos_token": spec.eos_token,
            "pad_token": None,
            "add_bos_token": spec.bos_token is not None,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": max_position_embeddings,
            "chat_template": spec.chat_template,
        },
    )
    dim = head_dim or hidden_size // num_heads
    _write_weights(
        out / "model.safetensors",
        num_layers=num_layers,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        q_size=num_heads * dim,
        kv_size=num_kv_heads * dim,
        qkv_bias=spec.qkv_bias,
        vocab_size=vocab_size,
        tied=tied,
        special_ids=sorted(ids.values()),
        seed=seed,
    )
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_weights(
    path: Path,
    *,
    num_layers: int,
    hidden_size: int,
    intermediate_size: int,
    q_size: int,
    kv_size: int,
    qkv_bias: bool,
    vocab_size: int,
    tied: bool,
    special_ids: list[int],
    seed: int,
) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32) * std

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return normal(out_features, in_features, std=gain * in_features**-0.5)

    def norm_weight() -> torch.Tensor:
        # Not all ones, so an engine that drops the norm weight fails the fidelity tests.
        return 1.0 + normal(hidden_size, std=0.1)

    # NOTE: the scales below were tuned so that greedy decoding does not loop on a few tokens
    # (see tests/cluster/test_tiny_model.py). A tied head reads the input embedding back, so a
    # large embedding makes every token predict itself: tied embeddings stay small. Sharper
    # attention (gain 2 on q and k) keeps the hidden state moving from step to step, and a
    # small v bias avoids adding the same vector at every position.
    embed = normal(vocab_size, hidden_size, std=0.02 if tied else 1.0)
    tensors = {"model.embed_tokens.weight": embed}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = norm_weight()
        tensors[p + "self_attn.q_proj.weight"] = linear(q_size, hidden_size, gain=2.0)
        tensors[p + "self_attn.k_proj.weight"] = linear(kv_size, hidden_size, gain=2.0)
        tensors[p + "self_attn.v_proj.weight"] = linear(kv_size, hidden_size)
        if qkv_bias:
            tensors[p + "self_attn.q_proj.bias"] = normal(q_size, std=0.5)
            tensors[p + "self_attn.k_proj.bias"] = normal(kv_size, std=0.5)
            tensors[p + "self_attn.v_proj.bias"] = normal(kv_size, std=0.05)
        tensors[p + "self_attn.o_proj.weight"] = linear(hidden_size, q_size)
        tensors[p + "post_attention_layernorm.weight"] = norm_weight()
        tensors[p + "mlp.gate_proj.weight"] = linear(intermediate_size, hidden_size)
        tensors[p + "mlp.up_proj.weight"] = linear(intermediate_size, hidden_size)
        tensors[p + "mlp.down_proj.weight"] = linear(hidden_size, intermediate_size)
    tensors["model.norm.weight"] = norm_weight()
    if not tied:
        tensors["lm_head.weight"] = linear(vocab_size, hidden_size)
    # Random weights would emit an end-of-sequence token at chance rate and cut completions
    # short; damping the special tokens' output rows keeps every completion full length.
    head = embed if tied else tensors["lm_head.weight"]
    head[special_ids] *= 0.1
    save_file(tensors, str(path), metadata={"format": "pt"})


def train_tokenizer(variant: str, vocab_size: int) -> Tokenizer:
    """Train the byte-level BPE of `variant` whose vocabulary, special tokens included, has
    exactly `vocab_size` entries; the special tokens take the last ids, as in Llama 3 and Qwen2."""
    spec = VARIANTS[variant]
    tokenizer = Tokenizer(models.BPE())
    if spec.nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(spec.split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    base_size = vocab_size - len(spec.special_tokens)
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus_lines(), trainer=trainer)
    if tokenizer.get_vocab_size() != base_size:
        raise ValueError(
            f"vocab_size {vocab_size} is larger than the shipped corpus supports "
            f"({tokenizer.get_vocab_size() + len(spec.special_tokens)} at most)"
        )
    tokenizer.add_special_tokens(list(spec.special_tokens))
    if spec.bos_token:
        bos = (spec.bos_token, tokenizer.token_to_id(spec.bos_token))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B:1", special_tokens=[bos]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer
