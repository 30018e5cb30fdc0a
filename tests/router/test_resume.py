"""Resuming a finished request by id: the bounded table, and what the new request inherits."""

from __future__ import annotations

import grpc
import pytest
from grpc_helpers import generate_status

from pdserve.api.client import build_request
from pdserve.api.errors import NotFound
from pdserve.api.sampling import SamplingParams
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.request_table import FinishedRequest, RequestTable
from pdserve.router.validation import validate

EARLIER = FinishedRequest(
    prompt_token_ids=(5, 6, 7),
    output_token_ids=(8, 9),
    params=SamplingParams(max_tokens=2, temperature=0.7, top_p=0.9, seed=42, stop=("END",)),
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_table_keeps_only_the_newest_entries():
    table = RequestTable(max_entries=2, ttl_s=60)
    for rid in ("a", "b", "c"):
        table.put(rid, EARLIER)
    assert len(table) == 2
    assert table.get("c") == EARLIER
    with pytest.raises(NotFound, match="'a'"):
        table.get("a")


def test_an_entry_older_than_the_ttl_is_gone():
    clock = Clock()
    table = RequestTable(max_entries=10, ttl_s=60, clock=clock)
    table.put("old", EARLIER)
    clock.now += 30
    table.put("new", EARLIER)
    clock.now += 31
    assert table.get("new") == EARLIER
    with pytest.raises(NotFound):
        table.get("old")
    assert len(table) == 1


def test_a_request_id_used_again_replaces_the_entry_and_its_age():
    clock = Clock()
    table = RequestTable(max_entries=2, ttl_s=60, clock=clock)
    table.put("a", EARLIER)
    table.put("b", EARLIER)
    clock.now += 50
    newer = FinishedRequest((1,), (2,), EARLIER.params)
    table.put("a", newer)
    table.put("c", EARLIER)  # evicts b, the oldest
    clock.now += 20
    assert table.get("a") == newer
    with pytest.raises(NotFound):
        table.get("b")


def resumed(tokenizer, request: pb.GenerateRequest, max_model_len: int = 64):
    return validate(
        request,
        tokenizer,
        vocab_size=tokenizer.vocab_size,
        max_model_len=max_model_len,
        earlier=EARLIER,
    )


def test_a_resume_without_input_continues_the_same_sequence_with_its_settings(tokenizer):
    request = pb.GenerateRequest(resume_from="r1")
    request.sampling.max_tokens = 5
    request.sampling.top_p = 0.5
    valid = resumed(tokenizer, request)
    assert valid.prompt_token_ids == (5, 6, 7) and valid.output_token_ids == (8, 9)
    assert valid.context == (5, 6, 7, 8, 9)
    assert valid.params == SamplingParams(
        max_tokens=5, temperature=0.7, top_p=0.5, seed=42, stop=("END",)
    )


def test_a_resume_with_input_is_a_new_turn_after_the_earlier_output(tokenizer):
    valid = resumed(tokenizer, build_request([11, 12], resume_from="r1", seed=3))
    assert valid.prompt_token_ids == (5, 6, 7, 8, 9, 11, 12)
    assert valid.output_token_ids == ()
    assert (valid.params.seed, valid.params.temperature) == (3, 0.7)
    text = resumed(tokenizer, build_request(" more", resume_from="r1"))
    tail = tokenizer.encode(" more", add_special_tokens=False)
    assert text.prompt_token_ids == (5, 6, 7, 8, 9, *tail)


def test_a_resume_with_a_chat_or_an_empty_turn_is_invalid(tokenizer):
    chat = build_request([{"role": "user", "content": "hi"}], resume_from="r1")
    with pytest.raises(ValueError, match="^chat:"):
        resumed(tokenizer, chat)
    with pytest.raises(ValueError, match="^text:"):
        resumed(tokenizer, build_request("", resume_from="r1"))


def test_a_resume_past_the_context_names_resume_from(tokenizer):
    with pytest.raises(ValueError, match="^resume_from:.*5 tokens"):
        resumed(tokenizer, pb.GenerateRequest(resume_from="r1"), max_model_len=5)


def test_resuming_an_unknown_request_is_not_found(server):
    code, details = generate_status(server.target, pb.GenerateRequest(resume_from="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert details.startswith("resume_from:") and "'nope'" in details


@pytest.mark.parametrize("role", ["prefill_worker", "decode_worker"])
def test_a_pin_to_an_unknown_worker_is_invalid_argument_naming_it(server, role):
    request = build_request("hello", max_tokens=2)
    setattr(request.placement, role, "gpu-9")
    code, details = generate_status(server.target, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"placement.{role}:") and "'gpu-9'" in details


def test_a_resume_counts_its_earlier_output_against_the_context(tokenizer):
    """3 prompt + 2 earlier output tokens leave 5 of a 10-token context: 6 more do not fit,
    or shrink to 5 with clamp_max_tokens."""
    request = pb.GenerateRequest(resume_from="r1")
    request.sampling.max_tokens = 6
    with pytest.raises(ValueError, match="max_tokens"):
        resumed(tokenizer, request, max_model_len=10)
    request.clamp_max_tokens = True
    assert resumed(tokenizer, request, max_model_len=10).params.max_tokens == 5
