"""The torch-free Tokenizer encodes and decodes exactly like transformers' AutoTokenizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import unicodedata

import pytest
from transformers import AutoTokenizer

from pdserve.api.errors import ModelLoadError
from pdserve.api.tokenizer import Tokenizer

TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends",
    "whitespace          runs   \t\t  everywhere     ",
    "numbers 1234567890 3.14159 -42 1e-5 $1,250,000",
    "café naïve résumé Straße smörgåsbord",
    "e\u0301 (combining accent) versus \u00e9 (precomposed)",
    "你好，世界。今天天气很好。",
    "こんにちは、世界。",
    "emoji 😀🎉👍 ❤️ 👩‍👩‍👧 🇯🇵 and a lone 🐍",
    "Привет, как дела? Γεια σου κόσμε. مرحبا",
    "def f(x):\n    return {'a': [x, x**2]}  # comment",
    "it's they're we've I'm you'll he'd IT'S",
    "punctuation!!! ??? ... --- ;;; (((",
    "<|begin_of_text|>user text that contains <|eot_id|> special tokens",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "unknown <|not_a_special_token|> marker",
    "x" * 500,
]

MODELS = ["tiny_llama_dir", "tiny_qwen2_dir"]


@pytest.fixture(params=MODELS)
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def both(model_dir):
    return Tokenizer.from_model_dir(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_autotokenizer(both, text):
    ours, hf = both
    assert ours.encode(text) == hf(text)["input_ids"]
    assert (
        ours.encode(text, add_special_tokens=False)
        == hf(text, add_special_tokens=False)["input_ids"]
    )


def test_llama_prepends_bos_once(tiny_llama_dir):
    tok = Tokenizer.from_model_dir(tiny_llama_dir)
    ids = tok.encode("hello")
    assert ids[0] == tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")
    assert tok.bos_token_id not in ids[1:]
    assert tok.encode("hello", add_special_tokens=False) == ids[1:]


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_autotokenizer(both, skip):
    ours, hf = both
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip
        )


def test_decode_round_trips_plain_text(both, model_dir):
    ours, _ = both
    nfc = json.loads((model_dir / "tokenizer.json").read_text())["normalizer"] is not None
    for text in TEXTS:
        expected = unicodedata.normalize("NFC", text) if nfc else text
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == expected


def test_vocab_size_counts_added_tokens(both):
    ours, hf = both
    assert ours.vocab_size == len(hf) == 1000


def test_bos_matches_autotokenizer(both):
    ours, hf = both
    assert ours.bos_token_id == hf.bos_token_id


def test_eos_ids_are_the_union_of_generation_config_and_tokenizer(tiny_llama_dir, tiny_qwen2_dir):
    llama = Tokenizer.from_model_dir(tiny_llama_dir)
    assert set(llama.eos_token_ids) == {
        llama.token_to_id("<|end_of_text|>"),
        llama.token_to_id("<|eot_id|>"),
    }
    qwen2 = Tokenizer.from_model_dir(tiny_qwen2_dir)
    assert set(qwen2.eos_token_ids) == {
        qwen2.token_to_id("<|im_end|>"),
        qwen2.token_to_id("<|endoftext|>"),
    }
    assert len(set(llama.eos_token_ids)) == len(llama.eos_token_ids)


def test_eos_from_tokenizer_config_alone_is_found(copy_of_llama):
    (copy_of_llama / "generation_config.json").unlink()
    config = json.loads((copy_of_llama / "config.json").read_text())
    del config["eos_token_id"]
    (copy_of_llama / "config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_model_dir(copy_of_llama)
    assert tok.eos_token_ids == (tok.token_to_id("<|eot_id|>"),)


def test_eos_in_config_json_as_a_single_int_is_included(copy_of_llama):
    (copy_of_llama / "generation_config.json").unlink()
    config = json.loads((copy_of_llama / "config.json").read_text())
    config["eos_token_id"] = 7
    (copy_of_llama / "config.json").write_text(json.dumps(config))
    assert 7 in Tokenizer.from_model_dir(copy_of_llama).eos_token_ids


@pytest.fixture
def copy_of_llama(tiny_llama_dir, tmp_path):
    # The weights are not needed to load a tokenizer.
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    return dst


def test_missing_tokenizer_json_is_named(copy_of_llama):
    (copy_of_llama / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_model_dir(copy_of_llama)


def test_missing_model_folder_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="nowhere"):
        Tokenizer.from_model_dir(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "file_name", ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
)
def test_malformed_file_is_named(copy_of_llama, file_name):
    (copy_of_llama / file_name).write_text("{not json")
    with pytest.raises(ModelLoadError, match=file_name):
        Tokenizer.from_model_dir(copy_of_llama)


def test_malformed_eos_token_id_names_the_key(copy_of_llama):
    (copy_of_llama / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    with pytest.raises(ModelLoadError, match="generation_config.json: eos_token_id"):
        Tokenizer.from_model_dir(copy_of_llama)


def test_special_token_missing_from_vocab_names_the_key(copy_of_llama):
    config = json.loads((copy_of_llama / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|nope|>"
    (copy_of_llama / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="eos_token"):
        Tokenizer.from_model_dir(copy_of_llama)


def test_special_tokens_written_as_added_token_objects_are_read(copy_of_llama):
    config = json.loads((copy_of_llama / "tokenizer_config.json").read_text())
    config["bos_token"] = {"__type": "AddedToken", "content": "<|begin_of_text|>"}
    (copy_of_llama / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.from_model_dir(copy_of_llama)
    assert tok.bos_token_id == tok.token_to_id("<|begin_of_text|>")


def test_tokenizer_config_is_optional(copy_of_llama):
    (copy_of_llama / "tokenizer_config.json").unlink()
    tok = Tokenizer.from_model_dir(copy_of_llama)
    assert tok.chat_template is None
    assert tok.encode("hi")[0] == tok.token_to_id("<|begin_of_text|>")


def test_api_modules_import_without_torch_or_transformers():
    code = (
        "import sys\n"
        "import pdserve.api.tokenizer, pdserve.api.chat_template\n"
        "import pdserve.api.detokenizer, pdserve.api.stop\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
