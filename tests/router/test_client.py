"""The Python client's request building and result folding (the RPCs run in test_server.py)."""

from __future__ import annotations

import pytest

from pdserve.api.client import Completion, build_request
from pdserve.api.messages import TokenLogprobs, Usage
from pdserve.proto import pdserve_pb2 as pb


def test_the_prompt_kind_picks_the_input_field():
    assert build_request("hi").WhichOneof("input") == "text"
    assert list(build_request([1, 2]).token_ids.ids) == [1, 2]
    assert build_request([]).WhichOneof("input") == "token_ids"
    chat = build_request([{"role": "user", "content": "hi"}], continue_final_message=True).chat
    assert [(m.role, m.content) for m in chat.messages] == [("user", "hi")]
    assert chat.continue_final_message and not chat.HasField("add_generation_prompt")


def test_sampling_keywords_set_only_what_is_given():
    request = build_request("hi", temperature=0.0, seed=None, stop="END", stop_token_ids=[7])
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert not request.sampling.HasField("seed")
    assert list(request.sampling.stop) == ["END"] and list(request.sampling.stop_token_ids) == [7]


def test_an_unknown_sampling_keyword_is_a_type_error():
    with pytest.raises(TypeError, match="top_q"):
        build_request("hi", top_q=0.5)


def test_completion_folds_the_stream():
    result = Completion()
    result.add(pb.GenerateResponse(request_id="r", token_ids=[4], text="a", prompt_token_ids=[1]))
    result.add(
        pb.GenerateResponse(
            request_id="r",
            token_ids=[5],
            text="b",
            logprobs=[pb.TokenLogprob(token_id=5, logprob=-1.0, top=[])],
            finish_reason="length",
            usage=pb.Usage(prompt_tokens=1, cached_prompt_tokens=0, completion_tokens=2),
            timings=pb.Timings(ttft_s=0.5, total_s=1.0),
        )
    )
    assert (result.request_id, result.prompt_token_ids, result.token_ids) == ("r", [1], [4, 5])
    assert (result.text, result.finish_reason) == ("ab", "length")
    assert result.logprobs == [TokenLogprobs(5, -1.0, ())]
    assert result.usage == Usage(1, 0, 2)
    assert result.timings["ttft_s"] == 0.5 and result.timings["queue_s"] == 0.0
