"""The router's gRPC face without workers: bad input, overload, unknown ids, health, reflection."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_helpers import GENERATE, generate_status, health_status, malformed_requests
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings

from pdserve.api.client import Client, build_request
from pdserve.proto import pdserve_pb2 as pb


def long_text(tokenizer, num_tokens: int) -> str:
    text = "the quick brown fox jumps over the lazy dog " * 4
    while len(tokenizer.encode(text)) < num_tokens:
        text += text
    return text


def with_unknown_field(request: pb.GenerateRequest, number: int) -> bytes:
    """The request as a newer client would send it: plus a varint field this server lacks."""
    return request.SerializeToString() + bytes([number << 3]) + b"\x01"


def sampling(**kwargs) -> pb.GenerateRequest:
    return build_request("hello", **kwargs)


BAD_REQUESTS = {
    "no input": (pb.GenerateRequest(), "input"),
    "empty text": (pb.GenerateRequest(text=""), "text"),
    "empty token ids": (pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids"),
    "token id past the vocab": (build_request([1, 2, 1000]), "token_ids.ids[2]"),
    "negative token id": (build_request([-1]), "token_ids.ids[0]"),
    "top_p zero": (sampling(top_p=0.0), "top_p"),
    "top_p above one": (sampling(top_p=1.5), "top_p"),
    "negative max_tokens": (sampling(max_tokens=-3), "max_tokens"),
    "zero max_tokens": (sampling(max_tokens=0), "max_tokens"),
    "negative temperature": (sampling(temperature=-0.5), "temperature"),
    "nan temperature": (sampling(temperature=float("nan")), "temperature"),
    "negative top_k": (sampling(top_k=-1), "top_k"),
    "min_p above one": (sampling(min_p=2.0), "min_p"),
    "zero repetition_penalty": (sampling(repetition_penalty=0.0), "repetition_penalty"),
    "presence_penalty too big": (sampling(presence_penalty=3.0), "presence_penalty"),
    "seed past 63 bits": (sampling(seed=2**64 - 1), "seed"),
    "empty stop string": (sampling(stop=["a", ""]), "stop"),
    "stop token past the vocab": (sampling(stop_token_ids=[5, 5000]), "stop_token_ids[1]"),
    "too many logprobs": (sampling(logprobs=21), "logprobs"),
    "no chat messages": (pb.GenerateRequest(chat=pb.Chat()), "chat.messages"),
    "chat role missing": (build_request([{"role": "", "content": "hi"}]), "chat.messages[0].role"),
    "unknown chat role": (
        build_request([{"role": "narrator", "content": "hi"}]),
        "chat.messages[0].role",
    ),
    "max_tokens past the context": (sampling(max_tokens=10_000), "sampling.max_tokens"),
    "continue a user message": (
        build_request([{"role": "user", "content": "hi"}], continue_final_message=True),
        "chat.messages[0].role",
    ),
    "request id too long": (build_request("hi", request_id="x" * 300), "request_id"),
    "text too long for any context": (build_request("ab" * 1_000_000), "text"),
    "pinned worker id too long": (
        build_request("hi", decode_worker="d" * 300),
        "placement.decode_worker",
    ),
}


@pytest.mark.parametrize("name", BAD_REQUESTS)
def test_bad_request_is_invalid_argument_naming_the_field(server, name):
    request, field = BAD_REQUESTS[name]
    code, details = generate_status(server.target, request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert details.startswith(f"{field}:"), details


def test_prompt_that_fills_the_context_is_invalid_argument(server, tokenizer):
    context = server.router.max_model_len
    for request, field in [
        (build_request(list(range(context))), "token_ids"),
        (build_request(long_text(tokenizer, context)), "text"),
    ]:
        code, details = generate_status(server.target, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(f"{field}:") and str(context) in details


@pytest.mark.parametrize(
    "raw, field",
    [
        (with_unknown_field(build_request("hi"), 15), "GenerateRequest"),
        (
            # field 5 (sampling), length-delimited, holding an unknown field 14
            build_request("hi").SerializeToString() + b"\x2a\x02" + bytes([14 << 3]) + b"\x01",
            "sampling",
        ),
    ],
)
def test_unknown_field_from_a_newer_client_is_named_by_number(server, raw, field):
    code, details = generate_status(server.target, raw)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(f"{field}:") and "field number 1" in details


def messages_status(target: str, messages: list[bytes]) -> tuple[grpc.StatusCode, str]:
    """Calls Generate with `messages` as the request stream (a client sends exactly one)."""
    with grpc.insecure_channel(target) as channel:
        call = channel.stream_stream(GENERATE, request_serializer=lambda b: b)
        try:
            list(call(iter(messages), timeout=10))
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_a_call_without_a_request_is_invalid_argument(server):
    code, details = messages_status(server.target, [])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request:")


def test_bytes_that_are_no_request_are_invalid_argument(server):
    code, details = generate_status(server.target, b"\xff\xff\xff")
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request:")


def test_valid_request_without_workers_is_unavailable(server):
    code, details = generate_status(server.target, build_request("hello", max_tokens=4))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "worker" in details


def test_overload_is_resource_exhausted_before_any_work(start_router):
    full = start_router(max_inflight=0)
    try:
        # even a malformed request: the router refuses before it looks at the request
        for request in (build_request("hello"), pb.GenerateRequest(text="")):
            code, details = generate_status(full.target, request)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
        # or before it reads one: a call without a request is refused all the same
        code, details = messages_status(full.target, [])
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    finally:
        full.stop()


def test_abort_of_an_unknown_request_is_not_found(server):
    with Client(server.target) as client, pytest.raises(grpc.RpcError) as info:
        client.abort("no-such-request", timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-request" in info.value.details()


def test_cluster_without_workers_is_not_serving(server, tokenizer):
    with Client(server.target) as client:
        status = client.status(timeout=10)
    assert not status.serving
    assert list(status.workers) == [] and status.inflight == 0
    assert status.model == "tiny-llama"
    assert status.vocab_size == tokenizer.vocab_size
    assert status.max_model_len == server.router.max_model_len


@pytest.mark.parametrize("service", ["", "pdserve.v1.Generation"])
def test_health_service_reports_not_serving_without_a_decode_worker(server, service):
    assert health_status(server.target, service) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_reflection_describes_the_generation_service(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="pdserve.v1.Generation"),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"pdserve.v1.Generation", "grpc.health.v1.Health"} <= names
    assert described.file_descriptor_response.file_descriptor_proto


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=malformed_requests())
def test_random_malformed_requests_crash_nothing(server, raw):
    code, details = generate_status(server.target, raw)
    # without workers a valid request ends UNAVAILABLE; nothing may end as a server fault
    assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE), details
    assert health_status(server.target, "") == health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.mark.parametrize(
    "method, message",
    [
        ("/pdserve.v1.Generation/Abort", pb.AbortRequest(request_id="x")),
        ("/pdserve.v1.Generation/GetClusterStatus", pb.ClusterStatusRequest()),
    ],
)
def test_every_rpc_refuses_an_unknown_field_by_number(server, method, message):
    raw = message.SerializeToString() + bytes([15 << 3]) + b"\x01"
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary(method, request_serializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as info:
            call(raw, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "field number 15" in info.value.details()


def test_requests_wait_for_kv_blocks_and_past_the_queue_bound_are_refused_at_once(start_router):
    running = start_router(max_queued=3)
    running.hold_kv_pool()
    try:
        with Client(running.target) as client:
            waiting = [client.generate([5, 6, 7], max_tokens=4, timeout=30) for _ in range(3)]
            running.wait_queued(3)
            status = client.status(timeout=10)
            assert status.inflight == 3 and status.queued == 3  # counted from arrival
            start = time.monotonic()
            code, details = generate_status(running.target, build_request([5, 6], max_tokens=4))
            assert time.monotonic() - start < 0.1
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 requests wait for KV blocks" in details and "router.max_queued" in details
            refusals = running.router.metrics.registry.get_sample_value
            assert refusals("pdserve_overload_refusal_seconds_count") == 1
            assert refusals("pdserve_overload_refusal_seconds_bucket", {"le": "0.1"}) == 1
            for stream in waiting:
                stream.cancel()
            running.wait_queued(0)
            assert running.router.num_inflight == 0
    finally:
        running.stop()


def test_a_queued_request_whose_deadline_passes_leaves_the_queue(start_router):
    running = start_router()
    running.hold_kv_pool()
    try:
        with Client(running.target) as client, pytest.raises(grpc.RpcError) as info:
            client.complete([5, 6, 7], max_tokens=4, timeout=0.5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running.wait_queued(0)
    finally:
        running.stop()
