"""gRPC helpers shared by the router and end-to-end tests: raw calls, health, a fuzzer."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import strategies as st

from pdserve.proto import pdserve_pb2 as pb

GENERATE = "/pdserve.v1.Generation/Generate"


def generate_status(
    target: str, request: pb.GenerateRequest | bytes
) -> tuple[grpc.StatusCode, str]:
    """Sends one request (a message, or raw bytes) and returns the status it ended with."""
    raw = request if isinstance(request, bytes) else request.SerializeToString()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=lambda b: b)
        try:
            list(call(raw, timeout=10))
        except grpc.RpcError as e:
            return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def health_status(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


# Fields of GenerateRequest as a fuzzer sends them: any value of the wire type, often invalid.
_ints = st.integers(-(2**63), 2**63 - 1)
_floats = st.floats(allow_nan=True, allow_infinity=True)
_sampling = st.fixed_dictionaries(
    {},
    optional={
        "max_tokens": _ints,
        "temperature": _floats,
        "top_k": _ints,
        "top_p": _floats,
        "min_p": _floats,
        "repetition_penalty": _floats,
        "presence_penalty": _floats,
        "frequency_penalty": _floats,
        "seed": st.integers(0, 2**64 - 1),
        "stop": st.lists(st.text(max_size=5), max_size=3),
        "stop_token_ids": st.lists(_ints, max_size=3),
        "ignore_eos": st.booleans(),
        "logprobs": _ints,
    },
)
_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["", "user", "assistant", "system", "tool", "🙂"]),
            "content": st.text(max_size=40),
        }
    ),
    max_size=4,
)


@st.composite
def malformed_requests(draw, max_tokens_cap: int | None = None) -> bytes:
    kind = draw(st.sampled_from(["bytes", "text", "tokens", "chat", "none"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    request = pb.GenerateRequest(request_id=draw(st.text(max_size=8)))
    if kind == "text":
        request.text = draw(st.text(max_size=80))
    elif kind == "tokens":
        request.token_ids.ids.extend(draw(st.lists(_ints, max_size=80)))
    elif kind == "chat":
        request.chat.messages.extend(pb.ChatMessage(**m) for m in draw(_messages))
        request.chat.continue_final_message = draw(st.booleans())
        if draw(st.booleans()):
            request.chat.add_generation_prompt = draw(st.booleans())
    sampling = draw(_sampling)
    if max_tokens_cap is not None and not -5 <= sampling.get("max_tokens", 16) <= max_tokens_cap:
        # NOTE: a request that is valid after all must end quickly on a real cluster.
        sampling["max_tokens"] = draw(st.integers(-5, max_tokens_cap))
    for name, value in sampling.items():
        if isinstance(value, list):
            getattr(request.sampling, name).extend(value)
        else:
            setattr(request.sampling, name, value)
    raw = request.SerializeToString()
    if draw(st.booleans()):
        raw += bytes([draw(st.integers(14, 15)) << 3]) + b"\x00"
    return raw
