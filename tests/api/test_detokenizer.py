"""Streaming detokenization never splits a character and adds up to the full decode."""

from __future__ import annotations

import random

import pytest

from pdserve.api.detokenizer import IncrementalDetokenizer
from pdserve.api.tokenizer import Tokenizer

TEXTS = [
    "Plain ASCII text, nothing special here.",
    "Emoji 😀🎉👍 and a family 👩‍👩‍👧 and a flag 🇯🇵 next to 🐍.",
    "中文：你好，世界。今天天气很好，我们去公园散步吧。",
    "日本語のテキスト、東京は大きな都市です。",
    "Mixed: café 山 🌊 résumé Γεια 안녕하세요 ∑∞√ end",
]

MODELS = ["tiny_llama_dir", "tiny_qwen2_dir"]


@pytest.fixture(params=MODELS)
def tokenizer(request):
    return Tokenizer.from_model_dir(request.getfixturevalue(request.param))


def _stream(tokenizer, prompt_ids, output_ids, chunks, skip_special_tokens=True):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas = []
    i = 0
    for size in chunks:
        deltas.append(detok.add(output_ids[i : i + size]))
        i += size
    deltas.append(detok.add(output_ids[i:]))
    return deltas, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_are_whole_characters_and_add_up(tokenizer, text):
    prompt = tokenizer.encode("Say something:")
    output = tokenizer.encode(text, add_special_tokens=False)
    deltas, tail = _stream(tokenizer, prompt, output, [1] * len(output))
    assert "".join(deltas) + tail == tokenizer.decode(output) == text
    assert tail == ""
    for delta in deltas:
        assert "\ufffd" not in delta
        delta.encode("utf-8")  # no lone surrogates


def test_multibyte_characters_really_span_tokens(tokenizer):
    """Guards the test above: with a 1000-token byte-level vocab, an emoji is several tokens,
    each of which decodes alone to U+FFFD."""
    ids = tokenizer.encode("🐍", add_special_tokens=False)
    assert len(ids) > 1
    assert "\ufffd" in tokenizer.decode(ids[:1])


def test_held_back_bytes_are_emitted_with_the_token_that_completes_them(tokenizer):
    ids = tokenizer.encode("a🐍", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, [])
    deltas = [detok.add([i]) for i in ids]
    assert deltas[0] == "a"
    assert deltas[1:-1] == [""] * (len(ids) - 2)
    assert deltas[-1] == "🐍"


@pytest.mark.parametrize("seed", range(5))
def test_chunked_adds_give_the_same_text(tokenizer, seed):
    rng = random.Random(seed)
    text = " ".join(rng.sample(TEXTS, len(TEXTS)))
    output = tokenizer.encode(text, add_special_tokens=False)
    chunks = [rng.randint(1, 4) for _ in range(len(output) // 2)]
    deltas, tail = _stream(tokenizer, tokenizer.encode("prompt"), output, chunks)
    assert "".join(deltas) + tail == text
    assert all("\ufffd" not in d for d in deltas)


def test_unfinished_character_at_the_end_is_flushed_as_the_full_decode_shows_it(tokenizer):
    ids = tokenizer.encode("end 🐍", add_special_tokens=False)[:-1]
    deltas, tail = _stream(tokenizer, [], ids, [1] * len(ids))
    assert "\ufffd" not in "".join(deltas)
    assert tail.endswith("\ufffd")
    assert "".join(deltas) + tail == tokenizer.decode(ids)


def test_invalid_bytes_in_the_middle_match_the_full_decode(tokenizer):
    snake = tokenizer.encode("🐍", add_special_tokens=False)
    ids = tokenizer.encode("x", add_special_tokens=False) + snake[:1]
    ids += tokenizer.encode(" then text", add_special_tokens=False)
    deltas, tail = _stream(tokenizer, [], ids, [1] * len(ids))
    assert "".join(deltas) + tail == tokenizer.decode(ids)
    assert "\ufffd" in "".join(deltas)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_follow_skip_special_tokens(tokenizer, skip):
    eos = tokenizer.eos_token_ids[0]
    output = tokenizer.encode("Done 🎉", add_special_tokens=False) + [eos]
    output += tokenizer.encode(" more", add_special_tokens=False)
    deltas, tail = _stream(tokenizer, [], output, [1] * len(output), skip_special_tokens=skip)
    text = "".join(deltas) + tail
    assert text == tokenizer.decode(output, skip_special_tokens=skip)
    assert (tokenizer.decode([eos]) in text) is not skip


def test_prompt_text_is_not_emitted(tokenizer):
    prompt = tokenizer.encode("The prompt ends here.")
    output = tokenizer.encode(" And the answer starts.", add_special_tokens=False)
    deltas, tail = _stream(tokenizer, prompt, output, [1] * len(output))
    assert "".join(deltas) + tail == " And the answer starts."


class _CountingTokenizer:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.longest = 0

    def decode(self, ids, skip_special_tokens=False):
        self.longest = max(self.longest, len(ids))
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_only_a_short_window(tokenizer):
    counting = _CountingTokenizer(tokenizer)
    prompt = tokenizer.encode("A long prompt " * 50)
    output = tokenizer.encode(" ".join(TEXTS) * 10, add_special_tokens=False)
    detok = IncrementalDetokenizer(counting, prompt)
    text = "".join(detok.add([i]) for i in output) + detok.flush()
    assert text == tokenizer.decode(output)
    assert len(output) > 500
    assert counting.longest <= 16
