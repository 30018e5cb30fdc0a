"""The OpenAI-compatible HTTP door and /metrics on a running cluster, through the official
`openai` client: the same request path, tokens and usage as the gRPC door."""

from __future__ import annotations

import threading
import time
import urllib.request

import openai
import pytest
from cluster_helpers import kv_bytes, wait_until_idle
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox jumps over the lazy dog. " * 6  # several full KV blocks


@pytest.fixture(scope="module")
def oai(cluster):
    with openai.OpenAI(base_url=f"http://{cluster.http_target}/v1", api_key="none") as c:
        yield c


def scrape(cluster) -> dict:
    """{sample name: {frozen labels: value}} of the router's /metrics."""
    with urllib.request.urlopen(f"http://{cluster.http_target}/metrics", timeout=10) as r:
        text = r.read().decode()
    samples: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return samples


def test_the_openai_client_lists_the_served_model(cluster, oai):
    assert [m.id for m in oai.models.list()] == [cluster.router.model_name]


def test_a_completion_has_the_grpc_doors_tokens_and_usage(cluster, client, oai):
    grpc_result = client.complete(PROMPT, max_tokens=12, ignore_eos=True)
    result = oai.completions.create(
        model=cluster.router.model_name,
        prompt=PROMPT,
        max_tokens=12,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert result.choices[0].text == grpc_result.text
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 12
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)  # a dict: equal strings merge
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(grpc_result.prompt_token_ids)
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    # the same prompt again: its blocks are in a prefix cache
    assert result.usage.prompt_tokens_details.cached_tokens > 0


def test_a_streamed_chat_completion_ends_with_usage(cluster, oai):
    stream = oai.chat.completions.create(
        model=cluster.router.model_name,
        messages=[{"role": "user", "content": "Say something."}],
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=2,
        seed=7,
        temperature=0.8,
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason in ("stop", "length")
    tokens = [lp for c in content if c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.completion_tokens == len(tokens) > 0
    text = "".join(c.choices[0].delta.content or "" for c in content)
    again = oai.chat.completions.create(
        model=cluster.router.model_name,
        messages=[{"role": "user", "content": "Say something."}],
        max_completion_tokens=10,
        seed=7,
        temperature=0.8,
    )
    assert again.choices[0].message.content == text  # seeded: the same tokens, whole or streamed


def test_bad_fields_reach_the_openai_client_as_400_naming_them(cluster, oai):
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(
            model=cluster.router.model_name,
            messages=[{"role": "user", "content": "hi"}],
            top_p=3.0,
        )
    assert refused.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        oai.completions.create(model="no-such-model", prompt="hi")


def cancelled(samples: dict) -> float:
    return sum(
        v
        for labels, v in samples["pdserve_requests_total"].items()
        if ("status", "CANCELLED") in labels
    )


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(cluster, oai):
    before = cancelled(scrape(cluster))
    stream = oai.completions.create(
        model=cluster.router.model_name,
        prompt=PROMPT,
        max_tokens=400,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    stream.close()
    statuses = wait_until_idle(cluster)
    assert all(s.running == 0 for s in statuses.values())
    deadline = time.monotonic() + 5
    while cluster.router.num_inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cluster.router.num_inflight == 0
    assert cancelled(scrape(cluster)) == before + 1  # it ended by the disconnect, not by length


def test_metrics_during_load_show_latencies_transfers_and_workers(cluster, oai):
    prompts = [f"{i} " + "tell me about the sea and the sky " * (3 + i) for i in range(4)]

    def run(prompt: str) -> None:
        oai.completions.create(
            model=cluster.router.model_name,
            prompt=prompt,
            max_tokens=24,
            extra_body={"ignore_eos": True},
        )

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    during = scrape(cluster)
    for t in threads:
        t.join()
    after = scrape(cluster)

    def total(samples: dict, name: str) -> float:
        return sum(samples.get(name, {}).values())

    workers = {dict(labels)["worker"] for labels in during["pdserve_worker_free_kv_blocks"]}
    assert workers == set(cluster.workers.all())
    assert total(during, "pdserve_worker_total_kv_blocks") > 0
    for name in (
        "pdserve_time_to_first_token_seconds",
        "pdserve_time_per_output_token_seconds",
        "pdserve_e2e_request_latency_seconds",
        "pdserve_kv_transfer_time_seconds",
        "pdserve_kv_transfer_bytes",
    ):
        assert total(after, f"{name}_count") >= len(prompts), name
        assert total(after, f"{name}_sum") > 0, name
    # every transfer moves whole tokens' KV: a multiple of one token's bytes
    assert total(after, "pdserve_kv_transfer_bytes_sum") % kv_bytes(1) == 0
    ok = {
        dict(labels)["finish_reason"]: v
        for labels, v in after["pdserve_requests_total"].items()
        if dict(labels)["status"] == "OK"
    }
    assert ok["length"] >= len(prompts)
