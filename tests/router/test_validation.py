"""GenerateRequest -> prompt token ids and SamplingParams, and the errors that name fields."""

from __future__ import annotations

import dataclasses
import time

import pytest

from pdserve.api.client import build_request
from pdserve.api.errors import InvalidRequest
from pdserve.api.sampling import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.validation import (
    check_serialized_text_size,
    reject_unknown_fields,
    validate,
)

CONTEXT = 64


def check(request: pb.GenerateRequest, tokenizer):
    return validate(request, tokenizer, vocab_size=tokenizer.vocab_size, max_model_len=CONTEXT)


def test_every_sampling_parameter_has_a_proto_field_of_the_same_name():
    proto = set(pb.SamplingOptions.DESCRIPTOR.fields_by_name)
    assert proto == {f.name for f in dataclasses.fields(SamplingParams)}


def test_unset_sampling_fields_take_the_defaults(tokenizer):
    assert check(build_request("hi"), tokenizer).params == SamplingParams()


def test_every_sampling_field_reaches_the_params(tokenizer):
    values = dict(
        max_tokens=7,
        temperature=0.0,
        top_k=5,
        top_p=0.5,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=-0.5,
        frequency_penalty=0.25,
        seed=2**63 - 1,
        stop=("a", "bc"),
        stop_token_ids=(3, 999),
        ignore_eos=True,
        logprobs=0,
    )
    assert check(build_request("hi", **values), tokenizer).params == SamplingParams(**values)


def test_zero_values_are_kept_apart_from_unset_ones(tokenizer):
    params = check(build_request("hi", temperature=0.0, top_k=0, logprobs=0), tokenizer).params
    assert (params.temperature, params.top_k, params.logprobs) == (0.0, 0, 0)
    assert check(build_request("hi"), tokenizer).params.logprobs is None


def test_max_tokens_past_the_context_is_refused_naming_both_numbers(tokenizer):
    prompt = check(build_request("hi"), tokenizer).prompt_token_ids
    with pytest.raises(InvalidRequest) as e:
        check(build_request("hi", max_tokens=CONTEXT), tokenizer)
    assert e.value.field == "sampling.max_tokens"
    assert f"{len(prompt)} prompt tokens + max_tokens {CONTEXT}" in str(e.value)
    assert f"context of {CONTEXT} tokens" in str(e.value)


def test_clamp_max_tokens_generates_what_the_context_leaves(tokenizer):
    request = build_request("hi", max_tokens=10 * CONTEXT, clamp_max_tokens=True)
    valid = check(request, tokenizer)
    assert valid.params.max_tokens == CONTEXT - len(valid.prompt_token_ids)


def test_unset_max_tokens_shrinks_to_fit_a_long_prompt(tokenizer):
    ids = list(range(3, 3 + CONTEXT - 4))
    assert check(build_request(ids), tokenizer).params.max_tokens == 4
    assert check(build_request([3, 4]), tokenizer).params.max_tokens == SamplingParams().max_tokens


def test_text_is_encoded_with_the_models_special_tokens(tokenizer):
    valid = check(build_request("hello world"), tokenizer)
    assert list(valid.prompt_token_ids) == tokenizer.encode("hello world")
    assert valid.prompt_token_ids[0] == tokenizer.bos_token_id


def test_token_ids_pass_unchanged(tokenizer):
    assert check(build_request([5, 0, 999]), tokenizer).prompt_token_ids == (5, 0, 999)


CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]


def test_chat_opens_an_assistant_turn_by_default(tokenizer):
    valid = check(build_request(CHAT[:1]), tokenizer)
    assert list(valid.prompt_token_ids) == tokenizer.encode_chat(CHAT[:1])
    closed = check(build_request(CHAT[:1], add_generation_prompt=False), tokenizer)
    assert len(closed.prompt_token_ids) < len(valid.prompt_token_ids)
    assert list(closed.prompt_token_ids) == tokenizer.encode_chat(
        CHAT[:1], add_generation_prompt=False
    )


def test_continue_final_message_continues_the_assistant_text(tokenizer):
    valid = check(build_request(CHAT, continue_final_message=True), tokenizer)
    text = tokenizer.decode(valid.prompt_token_ids)
    assert text.endswith("assistant<|end_header_id|>\n\nHel")


def test_special_tokens_are_skipped_unless_the_request_keeps_them(tokenizer):
    assert check(build_request("hi"), tokenizer).skip_special_tokens is True
    assert (
        check(build_request("hi", skip_special_tokens=False), tokenizer).skip_special_tokens
        is False
    )


def test_unknown_field_inside_a_chat_message_is_named_by_its_path(tokenizer):
    request = build_request(CHAT)
    raw = request.chat.messages[1].SerializeToString() + bytes([9 << 3]) + b"\x01"
    request.chat.messages[1].ParseFromString(raw)
    with pytest.raises(InvalidRequest) as info:
        reject_unknown_fields(request)
    assert info.value.field == "chat.messages[1]"
    assert "field number 9" in str(info.value)


def test_prompt_one_token_short_of_the_context_is_accepted(tokenizer):
    assert len(check(build_request([1] * (CONTEXT - 1)), tokenizer).prompt_token_ids) == 63
    with pytest.raises(InvalidRequest) as info:
        check(build_request([1] * CONTEXT), tokenizer)
    assert info.value.field == "token_ids"


@pytest.mark.parametrize("field", ["text", "chat"])
def test_text_too_long_for_any_tokenization_is_refused_before_tokenizing(tokenizer, field):
    limit = CONTEXT * tokenizer.max_token_chars
    text = "ab" * 2_000_000  # 4 MB: tokenizing it would take seconds
    request = build_request(text if field == "text" else [{"role": "user", "content": text}])
    start = time.perf_counter()
    with pytest.raises(InvalidRequest) as info:
        check(request, tokenizer)
    assert time.perf_counter() - start < 0.05
    assert info.value.field == field
    assert f"at most {limit} characters" in str(info.value)


def test_text_at_the_character_bound_is_tokenized_and_judged_by_its_tokens(tokenizer):
    limit = CONTEXT * tokenizer.max_token_chars
    with pytest.raises(InvalidRequest) as info:
        check(build_request("a" * limit), tokenizer)
    assert "tokens" in str(info.value) and "characters" not in str(info.value)
    assert len(check(build_request("a" * 10), tokenizer).prompt_token_ids) >= 1


def test_the_character_bound_never_refuses_text_that_fits(tokenizer):
    """The longest vocabulary entries, repeated: the densest text there is, one token each."""
    vocab = tokenizer._backend.get_vocab(with_added_tokens=True)
    longest = max(
        (t for t in vocab if tokenizer.encode(t, add_special_tokens=False) == [vocab[t]]), key=len
    )
    text = longest * (CONTEXT - 2)
    assert len(check(build_request(text), tokenizer).prompt_token_ids) < CONTEXT


def check_serialized(raw: bytes, tokenizer) -> None:
    check_serialized_text_size(raw, tokenizer, CONTEXT)


def test_serialized_text_past_the_byte_bound_is_refused_without_parsing(tokenizer):
    limit = 4 * CONTEXT * tokenizer.max_token_chars
    raw = build_request("ab" * 2_000_000, max_tokens=4, request_id="r").SerializeToString()
    start = time.perf_counter()
    with pytest.raises(InvalidRequest) as info:
        check_serialized(raw, tokenizer)
    assert time.perf_counter() - start < 0.005  # tags and lengths only: no copy of 4 MB
    assert info.value.field == "text"
    assert "4000000 bytes" in str(info.value) and f"at most {limit} bytes" in str(info.value)


def test_the_byte_bound_never_refuses_text_within_the_character_bound(tokenizer):
    """Four bytes of UTF-8 a character: the most bytes that text within that bound can have."""
    text = "\U0001f642" * (CONTEXT * tokenizer.max_token_chars)
    check_serialized(
        build_request(text, max_tokens=4, request_id="r").SerializeToString(), tokenizer
    )
    with pytest.raises(InvalidRequest) as info:
        check_serialized(build_request(text + "x").SerializeToString(), tokenizer)
    assert info.value.field == "text"


def test_the_byte_bound_looks_at_the_input_that_protobuf_keeps(tokenizer):
    """Of several input fields on the wire the last one wins: here token ids, not the text."""
    huge_text = build_request("ab" * 100_000).SerializeToString()
    raw = huge_text + pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2])).SerializeToString()
    assert pb.GenerateRequest.FromString(raw).WhichOneof("input") == "token_ids"
    check_serialized(raw, tokenizer)
    with pytest.raises(InvalidRequest):
        check_serialized(raw + huge_text, tokenizer)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff" * 100_000,  # a varint that never ends
        b"\x13" + b"\x00" * 100_000,  # a group: no GenerateRequest field is one
        build_request("ab" * 100_000).SerializeToString()[:-10],  # truncated
        b"\x08\x01" * 50_000,  # 50,000 top-level fields: more than a request can have
    ],
)
def test_bytes_that_are_no_request_are_left_to_the_parser(tokenizer, raw):
    start = time.perf_counter()
    check_serialized(raw, tokenizer)
    assert time.perf_counter() - start < 0.005
