"""The two doors `pdserve bench` can load: the router's gRPC port, or its OpenAI-compatible
HTTP door (`/v1/completions` with token-id prompts, streamed, usage included). Each sends one
request and returns what the client saw of it, as a `RequestRecord`.
"""

from __future__ import annotations

import json
import ssl
import time
from typing import Any, Protocol

import aiohttp
import grpc

from pdserve.api.client import AsyncClient
from pdserve.cluster.bench_report import RequestRecord


class Target(Protocol):
    async def send(self, prompt: list[int], max_tokens: int) -> RequestRecord: ...

    async def close(self) -> None: ...


SAMPLING = {"temperature": 0.0, "ignore_eos": True}  # every request yields max_tokens tokens


class GrpcTarget:
    def __init__(self, server: str, api_key: str | None, root_cert: str | None) -> None:
        self._client = AsyncClient(server, api_key=api_key, root_cert=root_cert)

    async def send(self, prompt: list[int], max_tokens: int) -> RequestRecord:
        record = RequestRecord(time.monotonic(), len(prompt))
        try:
            async for delta in self._client.generate(prompt, max_tokens=max_tokens, **SAMPLING):
                record.tokens_arrived(len(delta.token_ids), time.monotonic())
                record.output_ids.extend(delta.token_ids)
                if delta.finish_reason:
                    record.cached_tokens = delta.usage.cached_prompt_tokens
                    record.transfer_s = delta.timings.transfer_s
                    record.transfer_bytes = delta.timings.transfer_bytes
                    record.prefill_worker = delta.placement.prefill_worker
                    record.decode_worker = delta.placement.decode_worker
            record.end = time.monotonic()
        except grpc.RpcError as e:
            record.error = f"{e.code().name}: {e.details()}"
        return record

    async def close(self) -> None:
        await self._client.close()


class OpenAITarget:
    """`base_url` like `http://127.0.0.1:8000`; `model` as `/v1/models` lists it."""

    def __init__(
        self, base_url: str, model: str, api_key: str | None, root_cert: str | None
    ) -> None:
        self._url = base_url.rstrip("/") + "/v1/completions"
        self._model = model
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        context = ssl.create_default_context(cafile=root_cert) if root_cert else None
        self._session = aiohttp.ClientSession(
            headers=headers,
            connector=aiohttp.TCPConnector(limit=0, ssl=context if context else True),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def send(self, prompt: list[int], max_tokens: int) -> RequestRecord:
        body = {
            "model": self._model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            **SAMPLING,
        }
        record = RequestRecord(time.monotonic(), len(prompt))
        try:
            async with self._session.post(self._url, json=body) as response:
                if response.status != 200:
                    record.error = f"HTTP {response.status}: {await response.text()}"
                    return record
                async for event in _events(response):
                    self._on_event(record, event)
            record.end = time.monotonic()
        except (aiohttp.ClientError, ValueError) as e:
            record.error = f"{type(e).__name__}: {e}"
        return record

    @staticmethod
    def _on_event(record: RequestRecord, event: dict[str, Any]) -> None:
        if "error" in event:
            raise ValueError(event["error"].get("message", "error event"))
        if event.get("usage"):
            details = event["usage"].get("prompt_tokens_details") or {}
            record.cached_tokens = details.get("cached_tokens", 0)
        for choice in event.get("choices", ()):
            # NOTE: a chunk may carry several tokens (one decode step's, or text held back
            # until a character completed); it counts as one arrival here, and the usage at
            # the end corrects the token count that TPOT divides by.
            if choice.get("text"):
                record.tokens_arrived(1, time.monotonic())
        if event.get("usage") and not event.get("choices"):
            record.tokens = event["usage"]["completion_tokens"]

    async def close(self) -> None:
        await self._session.close()


async def _events(response: aiohttp.ClientResponse):
    """The JSON events of a server-sent event stream, until `[DONE]`."""
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
