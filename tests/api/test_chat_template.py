"""Chat templates render and tokenize exactly as transformers' apply_chat_template does."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from pdserve.api.chat_template import ChatTemplate
from pdserve.api.errors import InvalidRequest
from pdserve.api.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is 2 + 2?  "},
    ],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {"role": "assistant", "content": "Grey waves fold and break\nsalt wind over empty sand"},
        {"role": "user", "content": "Now one about 山 and 🌊, please.\n\n"},
    ],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "Text with <|eot_id|> and <|im_end|> markers inside."}],
]
PARTIAL_REPLIES = [
    "Sure, here is",
    "Sure, here is ",
    "Line one\nline two\n",
    "",
    "Emoji at the end 🎉",
]

MODELS = ["tiny_llama_dir", "tiny_qwen2_dir"]


@pytest.fixture(params=MODELS)
def model_dir(request):
    return request.getfixturevalue(request.param)


@pytest.fixture
def both(model_dir):
    return Tokenizer.from_model_dir(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_rendering_matches_transformers(both, conversation, add_generation_prompt):
    ours, hf = both
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
def test_chat_token_ids_match_transformers(both, conversation, add_generation_prompt):
    ours, hf = both
    messages = CONVERSATIONS[conversation]
    expected = hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
    )
    assert ours.encode_chat(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("reply", PARTIAL_REPLIES)
def test_continue_final_message_matches_transformers(both, reply):
    ours, hf = both
    messages = [*CONVERSATIONS[2], {"role": "assistant", "content": reply}]
    text = hf.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    ids = hf.apply_chat_template(
        messages, tokenize=True, return_dict=False, continue_final_message=True
    )
    assert ours.apply_chat_template(messages, False, continue_final_message=True) == text
    assert ours.encode_chat(messages, False, continue_final_message=True) == ids


def test_continued_prompt_ends_with_the_partial_reply_not_an_end_of_turn(tiny_qwen2_dir):
    tok = Tokenizer.from_model_dir(tiny_qwen2_dir)
    messages = [
        {"role": "user", "content": "Count to three."},
        {"role": "assistant", "content": "One, two,"},
    ]
    assert tok.apply_chat_template(messages, False, True).endswith(
        "<|im_start|>assistant\nOne, two,"
    )


def test_continue_final_message_overrides_the_generation_prompt(tiny_llama_dir):
    tok = Tokenizer.from_model_dir(tiny_llama_dir)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(messages, True, True) == tok.apply_chat_template(
        messages, False, True
    )


def test_llama_chat_ids_hold_exactly_one_bos(tiny_llama_dir):
    tok = Tokenizer.from_model_dir(tiny_llama_dir)
    ids = tok.encode_chat(CONVERSATIONS[1])
    assert ids.count(tok.bos_token_id) == 1
    assert ids[0] == tok.bos_token_id


@pytest.mark.parametrize(
    "messages, field",
    [
        ("hello", "messages"),
        ([], "messages"),
        ([{"role": "user", "content": "a"}, "b"], "messages[1]"),
        ([{"content": "a"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": 3, "content": "a"}], "messages[0].role"),
        ([{"role": "", "content": "a"}], "messages[0].role"),
        (
            [{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}],
            "messages[1].role",
        ),
        ([{"role": "user", "content": "a", "name": "x"}], "messages[0].name"),
        ([{"role": "user", "content": ["a"]}], "messages[0].content"),
    ],
)
def test_malformed_messages_name_the_field(tiny_llama_dir, messages, field):
    tok = Tokenizer.from_model_dir(tiny_llama_dir)
    with pytest.raises(InvalidRequest) as info:
        tok.encode_chat(messages)
    assert info.value.field == field


def test_continuing_a_user_message_is_refused(tiny_llama_dir):
    tok = Tokenizer.from_model_dir(tiny_llama_dir)
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(InvalidRequest) as info:
        tok.apply_chat_template(messages, False, continue_final_message=True)
    assert info.value.field == "messages[1].role"


def test_template_that_drops_the_final_message_cannot_continue_it():
    template = ChatTemplate("{% for m in messages %}{{ m['role'] }}:{% endfor %}")
    with pytest.raises(InvalidRequest) as info:
        template.render([{"role": "assistant", "content": "partial"}], False, True)
    assert info.value.field == "continue_final_message"


def test_raise_exception_in_a_template_is_an_invalid_request():
    template = ChatTemplate(
        "{% if messages[0]['role'] != 'user' %}"
        "{{ raise_exception('Conversations must start with a user message') }}"
        "{% endif %}{{ messages[0]['content'] }}"
    )
    assert template.render([{"role": "user", "content": "ok"}]) == "ok"
    with pytest.raises(InvalidRequest, match="must start with a user message") as info:
        template.render([{"role": "assistant", "content": "no"}])
    assert info.value.field == "messages"


def test_model_without_a_chat_template_refuses_messages(tiny_llama_dir, tmp_path):
    config = json.loads((tiny_llama_dir / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "tokenizer.json").write_bytes((tiny_llama_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_model_dir(tmp_path)
    with pytest.raises(InvalidRequest, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def _tokenizer_files(src, dst, config_edit=None):
    config = json.loads((src / "tokenizer_config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "tokenizer_config.json").write_text(json.dumps(config))
    (dst / "tokenizer.json").write_bytes((src / "tokenizer.json").read_bytes())
    return dst


def test_chat_template_jinja_file_takes_priority(tiny_llama_dir, tmp_path):
    _tokenizer_files(tiny_llama_dir, tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[-1]['content'] }}")
    tok = Tokenizer.from_model_dir(tmp_path)
    hf = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "plain"}]
    assert tok.apply_chat_template(messages) == "<|begin_of_text|>plain"
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)


def test_named_chat_templates_use_the_default_one(tiny_llama_dir, tmp_path):
    def edit(config):
        config["chat_template"] = [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default:{{ messages[0]['content'] }}"},
        ]

    tok = Tokenizer.from_model_dir(_tokenizer_files(tiny_llama_dir, tmp_path, edit))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "default:x"


def test_template_that_does_not_compile_is_a_model_load_error(tiny_llama_dir, tmp_path):
    from pdserve.api.errors import ModelLoadError

    def edit(config):
        config["chat_template"] = "{% for m in messages %}"

    with pytest.raises(ModelLoadError, match="chat_template"):
        Tokenizer.from_model_dir(_tokenizer_files(tiny_llama_dir, tmp_path, edit))


def test_template_helpers_behave_like_transformers():
    source = (
        "{{ messages | tojson }}|{{ strftime_now('%Y') | length }}|"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
        "{% if loop.index == 1 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}|"
        "{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    messages = [{"role": "user", "content": "<b>é</b>"}, {"role": "user", "content": "x"}]
    rendered = ChatTemplate(source, {"eos_token": "</s>"}).render(messages)
    assert rendered == json.dumps(messages, ensure_ascii=False) + "|4|1|</s>"


def test_trim_and_lstrip_blocks_are_on():
    source = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert ChatTemplate(source).render(messages) == "    a\n    b\n"
