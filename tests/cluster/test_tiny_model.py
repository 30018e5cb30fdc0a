"""The tiny model folders load in transformers, are reproducible, and decode non-degenerately."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pdserve.cluster.tiny_model import make_tiny_model, train_tokenizer

MODELS = ["tiny_llama_dir", "tiny_qwen2_dir", "tiny_llama3_rope_dir"]
FILES = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
]
PROMPTS = [
    "Hi",
    "The quick brown fox",
    "In 1887, the librarians of the old library",
    "def fibonacci(n):\n    numbers = [0, 1]\n",
    "你好，世界。今天天气很好",
    "Alice and Bob walked quietly along the narrow path toward the old harbor.",
    '"Can you fix the engine?" asked Maria. "Not today," said Kenji. The storm was coming '
    "in from the sea, and the small boats had already returned to the harbor.",
    "Questions people often ask:\n1. How long does the journey take? About three hours by "
    "train, or five by car.\n2. Is there a discount for students? Yes, 25% with a valid card."
    "\n3. Can I bring a bicycle?",
]


@pytest.fixture(params=MODELS)
def model_dir(request):
    return request.getfixturevalue(request.param)


def test_same_arguments_give_identical_files(tmp_path, tiny_qwen2_dir):
    again = make_tiny_model(
        tmp_path / "again",
        variant="qwen2",
        hidden_size=320,
        num_heads=4,
        num_kv_heads=4,
        head_dim=80,
    )
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_qwen2_dir / name).read_bytes(), name


def test_seed_changes_weights_but_not_tokenizer(tmp_path, tiny_llama_dir):
    other = make_tiny_model(tmp_path / "seed1", seed=1)
    for name in ("tokenizer.json", "config.json"):
        assert (other / name).read_bytes() == (tiny_llama_dir / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (
        tiny_llama_dir / "model.safetensors"
    ).read_bytes()


def test_default_llama_has_the_documented_shape(tiny_llama_dir):
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (4, 256, 688)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (1000, 2048)
    assert config.tie_word_embeddings is False
    assert config.rope_parameters["rope_type"] == "default"
    names = _tensor_names(tiny_llama_dir)
    assert "lm_head.weight" in names
    assert not any(name.endswith(".bias") for name in names)


def test_qwen2_has_qkv_bias_and_tied_embeddings(tiny_qwen2_dir):
    config = AutoConfig.from_pretrained(tiny_qwen2_dir)
    assert config.architectures == ["Qwen2ForCausalLM"]
    assert (config.head_dim, config.num_attention_heads, config.num_key_value_heads) == (80, 4, 4)
    assert config.tie_word_embeddings is True
    assert config.rms_norm_eps == 1e-6
    names = _tensor_names(tiny_qwen2_dir)
    assert "lm_head.weight" not in names
    for proj in "qkv":
        assert f"model.layers.3.self_attn.{proj}_proj.bias" in names
    assert "model.layers.0.self_attn.o_proj.bias" not in names


def test_llama3_rope_scaling_reaches_transformers(tiny_llama3_rope_dir):
    config = AutoConfig.from_pretrained(tiny_llama3_rope_dir)
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 8.0
    assert config.rope_parameters["original_max_position_embeddings"] == 256


def test_tensors_have_hf_names_and_shapes(tiny_qwen2_dir):
    with safe_open(tiny_qwen2_dir / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").shape == (1000, 320)
        assert f.get_tensor("model.layers.0.self_attn.q_proj.weight").shape == (320, 320)
        assert f.get_tensor("model.layers.0.self_attn.k_proj.bias").shape == (320,)
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").shape == (320, 688)
        assert f.get_tensor("model.norm.weight").dtype == torch.float32


def test_tokenizer_has_exactly_vocab_size_ids_with_special_tokens_last(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    assert len(tok) == config["vocab_size"] == 1000
    special = sorted(tok.convert_tokens_to_ids(t) for t in tok.added_tokens_encoder)
    assert special == list(range(1000 - len(special), 1000))


def test_llama_adds_bos_and_qwen2_does_not(tiny_llama_dir, tiny_qwen2_dir):
    llama = AutoTokenizer.from_pretrained(tiny_llama_dir)
    assert llama("hello")["input_ids"][0] == llama.convert_tokens_to_ids("<|begin_of_text|>")
    qwen2 = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    assert qwen2.bos_token is None
    assert qwen2("hello")["input_ids"] == qwen2("hello", add_special_tokens=False)["input_ids"]


def test_llama_generation_config_lists_end_of_text_and_eot(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    gen = json.loads((tiny_llama_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"])


def test_vocab_larger_than_the_corpus_supports_is_refused():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer("llama", 50_000)


def test_bad_head_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        make_tiny_model(tmp_path, num_heads=4, num_kv_heads=3)


def test_greedy_generation_is_not_degenerate(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    completions = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=0)
        completions.append(out[0, ids.shape[1] :].tolist())
    assert len({len(tok(p)["input_ids"]) for p in PROMPTS}) == len(PROMPTS)
    for prompt, completion in zip(PROMPTS, completions):
        # Full length: the model does not end early on an EOS token.
        assert len(completion) == 64, prompt
        assert len(set(completion)) >= 8, (prompt, completion)
    assert len({tuple(c) for c in completions}) == len(PROMPTS)


def _tensor_names(model_dir) -> set[str]:
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        return set(f.keys())
