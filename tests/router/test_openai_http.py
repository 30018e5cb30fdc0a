"""The router's HTTP door without workers: OpenAI's error shapes and codes, API keys, TLS,
`/v1/models` and `/metrics` (everything the router answers on its own)."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.router.auth import ServerTLS
from pdserve.router.openai_protocol import parse_request

KEY = "sk-test-key"


def call(
    base: str,
    path: str,
    body: object | None = None,
    *,
    key: str | None = None,
    raw: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a GET (no body) or POST."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def http(start_router):
    running = start_router(http_listen="127.0.0.1:0", openai=True)
    yield f"http://127.0.0.1:{running.router.http_port}"
    running.stop()


@pytest.fixture(scope="module")
def keyed_http(start_router):
    running = start_router(http_listen="127.0.0.1:0", openai=True, api_keys=[KEY])
    yield f"http://127.0.0.1:{running.router.http_port}"
    running.stop()


def chat(**fields) -> dict:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], **fields}


BAD_FIELDS = {
    "temperature as a string": ("/v1/chat/completions", chat(temperature="hot"), "temperature"),
    "negative temperature": ("/v1/chat/completions", chat(temperature=-1), "temperature"),
    "top_p above one": ("/v1/chat/completions", chat(top_p=1.5), "top_p"),
    "zero max_tokens": ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    "negative max_completion_tokens": (
        "/v1/chat/completions",
        chat(max_completion_tokens=-2),
        "max_completion_tokens",
    ),
    "max_tokens past the context": (
        "/v1/chat/completions",
        chat(max_tokens=10_000),
        "max_tokens",
    ),
    "n of two": ("/v1/chat/completions", chat(n=2), "n"),
    "negative seed": ("/v1/chat/completions", chat(seed=-1), "seed"),
    "stop as a number": ("/v1/chat/completions", chat(stop=5), "stop"),
    "unknown field": ("/v1/chat/completions", chat(tools=[]), "tools"),
    "no messages": ("/v1/chat/completions", {"messages": []}, "messages"),
    "unknown role": (
        "/v1/chat/completions",
        {"messages": [{"role": "narrator", "content": "hi"}]},
        "messages[0].role",
    ),
    "image part": (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content[0].type",
    ),
    "top_logprobs without logprobs": ("/v1/chat/completions", chat(top_logprobs=2), "top_logprobs"),
    "too many top_logprobs": (
        "/v1/chat/completions",
        chat(logprobs=True, top_logprobs=50),
        "top_logprobs",
    ),
    "token id past the vocab": ("/v1/completions", {"prompt": [1, 2, 99999]}, "prompt[2]"),
    "empty prompt": ("/v1/completions", {"prompt": ""}, "prompt"),
    "two prompts": ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    "priority past int32": ("/v1/completions", {"prompt": "hi", "priority": 2**40}, "priority"),
    "stream_options without stream": (
        "/v1/completions",
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        "stream_options",
    ),
}


@pytest.mark.parametrize("name", BAD_FIELDS)
def test_a_bad_field_is_400_naming_it(http, name):
    path, body, field = BAD_FIELDS[name]
    status, answer = call(http, path, body)
    assert status == 400, answer
    error = answer["error"]
    assert error["param"] == field, error
    assert error["message"].startswith(f"{field}:"), error
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "INVALID_ARGUMENT"


def test_a_body_that_is_not_json_is_400(http):
    status, answer = call(http, "/v1/completions", raw=b"{not json")
    assert status == 400
    assert answer["error"]["param"] == "body"


def test_an_unknown_model_is_404(http):
    status, answer = call(http, "/v1/chat/completions", chat(model="gpt-4"))
    assert status == 404
    assert answer["error"]["param"] == "model"
    assert "tiny-llama" in answer["error"]["message"]


def test_a_valid_request_without_workers_is_503(http):
    status, answer = call(http, "/v1/chat/completions", chat(max_tokens=4))
    assert status == 503, answer
    assert answer["error"]["code"] == "UNAVAILABLE"


def test_overload_is_429(start_router):
    full = start_router(http_listen="127.0.0.1:0", openai=True, max_inflight=0)
    try:
        status, answer = call(
            f"http://127.0.0.1:{full.router.http_port}", "/v1/completions", {"prompt": "hi"}
        )
    finally:
        full.stop()
    assert status == 429, answer
    assert answer["error"]["type"] == "rate_limit_error"


def test_an_unknown_path_is_404_in_openai_shape(http):
    status, answer = call(http, "/v1/embeddings", {"input": "x"})
    assert status == 404
    assert "error" in answer


def test_models_lists_the_served_model(http):
    status, answer = call(http, "/v1/models")
    assert status == 200
    assert [m["id"] for m in answer["data"]] == ["tiny-llama"]


@pytest.mark.parametrize("key", [None, "sk-wrong"])
def test_without_a_known_key_the_api_is_401(keyed_http, key):
    for path, body in (("/v1/models", None), ("/v1/chat/completions", chat())):
        status, answer = call(keyed_http, path, body, key=key)
        assert status == 401, (path, answer)
        assert answer["error"]["type"] == "authentication_error"


def test_with_a_known_key_the_api_answers(keyed_http):
    assert call(keyed_http, "/v1/models", key=KEY)[0] == 200
    # past the key check, the request reaches the router (which has no workers)
    assert call(keyed_http, "/v1/chat/completions", chat(), key=KEY)[0] == 503


def test_metrics_need_no_key(keyed_http):
    with urllib.request.urlopen(keyed_http + "/metrics", timeout=10) as response:
        assert response.status == 200


def test_metrics_count_refused_requests_by_status(start_router):
    running = start_router(http_listen="127.0.0.1:0", openai=True)
    base = f"http://127.0.0.1:{running.router.http_port}"
    try:
        call(base, "/v1/chat/completions", chat(top_p=7))
        call(base, "/v1/chat/completions", chat())
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        running.stop()
    counts = {
        (s.labels["finish_reason"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "pdserve_requests"
        for s in family.samples
        if s.name == "pdserve_requests_total"
    }
    assert counts == {("none", "INVALID_ARGUMENT"): 1.0, ("none", "UNAVAILABLE"): 1.0}


def test_the_http_door_serves_tls_with_the_grpc_certificate(start_router, tls_files):
    cert, key = tls_files
    running = start_router(
        http_listen="127.0.0.1:0", openai=True, tls=ServerTLS.from_files(cert, key)
    )
    try:
        context = ssl.create_default_context(cafile=str(cert))
        status, answer = call(
            f"https://localhost:{running.router.http_port}", "/v1/models", context=context
        )
    finally:
        running.stop()
    assert status == 200
    assert answer["data"][0]["id"] == "tiny-llama"


def test_metrics_only_door_has_no_api(start_router):
    running = start_router(http_listen="127.0.0.1:0")
    base = f"http://127.0.0.1:{running.router.http_port}"
    try:
        status, _ = call(base, "/v1/models")
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            metrics_status = response.status
    finally:
        running.stop()
    assert (status, metrics_status) == (404, 200)


def test_priority_reaches_the_request_as_vllm_names_it():
    parsed = parse_request({"prompt": "hi", "priority": -3}, chat=False, request_id="r")
    assert parsed.request.priority == -3
