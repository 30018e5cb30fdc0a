"""Token deltas become response messages: whole characters only, stop strings, usage, timings."""

from __future__ import annotations

import time

from pdserve.api.messages import Timings, TokenDelta, TokenLogprobs, Usage
from pdserve.api.sampling import SamplingParams
from pdserve.router.placement import Assignment
from pdserve.router.responses import ResponseBuilder

PROMPT = (995, 71, 72)
PLACED = Assignment("prefill-1", "decode-0")


def builder(tokenizer, **params) -> ResponseBuilder:
    return ResponseBuilder(
        "r", tokenizer, PROMPT, SamplingParams(**params), time.monotonic(), PLACED
    )


def test_a_character_split_across_tokens_is_never_sent_broken(tokenizer):
    ids = tokenizer.encode("ok 🙂 héllo", add_special_tokens=False)
    b = builder(tokenizer)
    texts = []
    for i, token in enumerate(ids):
        final = i == len(ids) - 1
        texts.append(
            b.on_delta(TokenDelta("r", (token,), finish_reason="length" if final else None)).text
        )
    assert all("\ufffd" not in t for t in texts)
    assert "".join(texts) == "ok 🙂 héllo"
    assert "" in texts  # some tokens held back half a character


def test_prompt_token_ids_come_with_the_first_message_only(tokenizer):
    b = builder(tokenizer)
    first = b.on_delta(TokenDelta("r", (256,)))
    second = b.on_delta(TokenDelta("r", (75,)))
    assert list(first.prompt_token_ids) == list(PROMPT)
    assert list(second.prompt_token_ids) == []


def test_stop_string_ends_the_request_before_the_worker_does(tokenizer):
    ids = tokenizer.encode("hello world stop here", add_special_tokens=False)
    b = builder(tokenizer, stop=("stop",))
    out = []
    for token in ids:
        out.append(b.on_delta(TokenDelta("r", (token,))))
        if b.finish_reason:
            break
    assert b.finish_reason == "stop" and out[-1].finish_reason == "stop"
    assert "".join(m.text for m in out) == "hello world "
    assert out[-1].usage.completion_tokens == len(out) < len(ids)
    assert all(not m.finish_reason for m in out[:-1])


def test_last_message_carries_usage_and_timings(tokenizer):
    b = builder(tokenizer)
    b.on_delta(TokenDelta("r", (256,)))
    time.sleep(0.01)
    last = b.on_delta(
        TokenDelta(
            "r",
            (75,),
            finish_reason="length",
            usage=Usage(prompt_tokens=3, cached_prompt_tokens=2, completion_tokens=2),
            timings=Timings(queue_s=0.1, prefill_s=0.2, transfer_s=0.3),
        )
    )
    assert last.finish_reason == "length"
    assert (last.usage.prompt_tokens, last.usage.cached_prompt_tokens) == (3, 2)
    assert last.usage.completion_tokens == 2
    t = last.timings
    assert (t.queue_s, t.prefill_s, t.transfer_s) == (0.1, 0.2, 0.3)
    assert 0 < t.ttft_s < t.total_s < 9.0  # the router's own clock


def test_logprobs_are_passed_on(tokenizer):
    lp = TokenLogprobs(256, -0.5, ((256, -0.5), (75, -1.5)))
    msg = builder(tokenizer, logprobs=2).on_delta(TokenDelta("r", (256,), logprobs=(lp,)))
    (got,) = msg.logprobs
    assert (got.token_id, got.logprob) == (256, -0.5)
    assert [(t.token_id, t.logprob) for t in got.top] == [(256, -0.5), (75, -1.5)]


def test_special_tokens_show_in_the_text_only_when_kept(tokenizer):
    eot = tokenizer.token_to_id("<|eot_id|>")
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    delta = TokenDelta("r", (*hello, eot), finish_reason="stop")
    args = ("r", tokenizer, PROMPT, SamplingParams(), time.monotonic(), PLACED)
    assert ResponseBuilder(*args).on_delta(delta).text == "Hello"
    assert ResponseBuilder(*args, skip_special_tokens=False).on_delta(delta).text == (
        "Hello<|eot_id|>"
    )


def test_the_last_message_says_where_the_request_ran(tokenizer):
    b = builder(tokenizer)
    first = b.on_delta(TokenDelta("r", (256,)))
    last = b.on_delta(TokenDelta("r", (75,), finish_reason="length", prefilled_by=""))
    assert not first.HasField("placement")
    assert (last.placement.prefill_worker, last.placement.decode_worker) == ("", "decode-0")
    b = builder(tokenizer, stop=["ab"])
    stopped = b.on_delta(TokenDelta("r", tuple(tokenizer.encode("xab", add_special_tokens=False))))
    assert stopped.finish_reason == "stop"
    assert stopped.placement.prefill_worker == "prefill-1"
