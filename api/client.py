"""Python client of a pdserve router: `Client` (blocking) and `AsyncClient` (asyncio).

    with Client("127.0.0.1:50051") as client:
        for delta in client.generate("Once upon a time", max_tokens=32, temperature=0):
            print(delta.text, end="", flush=True)
        result = client.complete([{"role": "user", "content": "Hi!"}], max_tokens=16)

The prompt is text, a list of token ids, or chat messages (dicts with "role" and "content");
None with `resume_from="<earlier request id>"` continues that request where it stopped.
Sampling settings are keyword arguments named as in `SamplingParams`; None leaves one unset.
Failures surface as `grpc.RpcError` carrying the server's status code.

A router with TLS and API keys takes `Client(address, api_key=..., root_cert="ca.pem")`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from pdserve.api.messages import TokenLogprobs, Usage
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]

_SAMPLING_FIELDS = frozenset(pb.SamplingOptions.DESCRIPTOR.fields_by_name)

RootCert = bytes | str | os.PathLike[str]  # PEM bytes, or the path of a PEM file


def _connection(
    api_key: str | None, root_cert: RootCert | None
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...] | None]:
    """TLS credentials trusting `root_cert` (PEM bytes, or a path to them) when it is given,
    and the metadata that every call carries."""
    credentials = None
    if root_cert is not None:
        pem = root_cert if isinstance(root_cert, bytes) else Path(root_cert).read_bytes()
        credentials = grpc.ssl_channel_credentials(root_certificates=pem)
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
    return credentials, metadata


@dataclass
class Completion:
    """A finished request; `timings` holds queue_s, prefill_s, transfer_s, ttft_s, total_s;
    `prefill_worker` is "" when the decode worker computed the prompt itself."""

    request_id: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    usage: Usage = field(default_factory=lambda: Usage(0, 0, 0))
    timings: dict[str, float] = field(default_factory=dict)
    prefill_worker: str = ""
    decode_worker: str = ""

    def add(self, delta: pb.GenerateResponse) -> None:
        """Folds one streamed message into the result."""
        self.request_id = delta.request_id
        self.prompt_token_ids.extend(delta.prompt_token_ids)
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        self.logprobs.extend(
            TokenLogprobs(lp.token_id, lp.logprob, tuple((t.token_id, t.logprob) for t in lp.top))
            for lp in delta.logprobs
        )
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
            u = delta.usage
            self.usage = Usage(u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens)
            self.timings = {
                n: getattr(delta.timings, n) for n in pb.Timings.DESCRIPTOR.fields_by_name
            }
            self.prefill_worker = delta.placement.prefill_worker
            self.decode_worker = delta.placement.decode_worker


def build_request(
    prompt: Prompt | None,
    *,
    request_id: str = "",
    resume_from: str = "",
    prefill_worker: str = "",
    decode_worker: str = "",
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    skip_special_tokens: bool | None = None,
    clamp_max_tokens: bool | None = None,
    priority: int | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """The `GenerateRequest` for a prompt; raises TypeError for an unknown sampling name.
    Unset settings take the server's defaults (greedy, 16 tokens); `clamp_max_tokens=True`
    shrinks max_tokens to what the context leaves instead of failing. `prefill_worker` and
    `decode_worker` pin the request to those workers. `priority` orders requests that wait
    for KV blocks (lower first; default 0)."""
    request = pb.GenerateRequest(request_id=request_id, resume_from=resume_from)
    request.placement.prefill_worker = prefill_worker
    request.placement.decode_worker = decode_worker
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], Mapping):
        request.chat.messages.extend(
            pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt
        )
        request.chat.continue_final_message = continue_final_message
        if add_generation_prompt is not None:
            request.chat.add_generation_prompt = add_generation_prompt
    elif prompt is not None:
        request.token_ids.ids.extend(prompt)
    if skip_special_tokens is not None:
        request.skip_special_tokens = skip_special_tokens
    if clamp_max_tokens is not None:
        request.clamp_max_tokens = clamp_max_tokens
    if priority is not None:
        request.priority = priority
    for name, value in sampling.items():
        if name not in _SAMPLING_FIELDS:
            raise TypeError(f"unknown sampling setting {name!r}")
        if value is None:
            continue
        if name in ("stop", "stop_token_ids"):
            getattr(request.sampling, name).extend([value] if isinstance(value, str) else value)
        else:
            setattr(request.sampling, name, value)
    return request


class Client:
    """A blocking client; one channel, safe to share between threads. `root_cert` (PEM bytes
    or a path) makes the channel TLS; `api_key` goes with every call as a bearer token."""

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        root_cert: RootCert | None = None,
    ) -> None:
        credentials, self._metadata = _connection(api_key, root_cert)
        if credentials is None:
            self._channel = grpc.insecure_channel(address)
        else:
            self._channel = grpc.secure_channel(address, credentials)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(
        self, prompt: Prompt | None, *, timeout: float | None = None, **kwargs: Any
    ) -> Iterator[pb.GenerateResponse]:
        """Streams the response messages; `.cancel()` on the returned iterator cancels the
        request (its KV blocks are freed at once)."""
        return self._stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout, metadata=self._metadata
        )

    def complete(
        self, prompt: Prompt | None, *, timeout: float | None = None, **kwargs: Any
    ) -> Completion:
        result = Completion()
        for delta in self.generate(prompt, timeout=timeout, **kwargs):
            result.add(delta)
        return result

    def abort(self, request_id: str, *, timeout: float | None = None) -> None:
        self._stub.Abort(
            pb.AbortRequest(request_id=request_id), timeout=timeout, metadata=self._metadata
        )

    def status(self, *, timeout: float | None = None) -> pb.ClusterStatus:
        return self._stub.GetClusterStatus(
            pb.ClusterStatusRequest(), timeout=timeout, metadata=self._metadata
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio client; create it inside the event loop that uses it. `api_key` and
    `root_cert` as for `Client`."""

    def __init__(
        self,
        address: str,
        *,
        api_key: str | None = None,
        root_cert: RootCert | None = None,
    ) -> None:
        credentials, self._metadata = _connection(api_key, root_cert)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(address)
        else:
            self._channel = grpc.aio.secure_channel(address, credentials)
        self._stub = pb_grpc.GenerationStub(self._channel)

    def generate(
        self, prompt: Prompt | None, *, timeout: float | None = None, **kwargs: Any
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Streams the response messages (`async for`); `.cancel()` on the returned call
        cancels the request."""
        return self._stub.Generate(
            build_request(prompt, **kwargs), timeout=timeout, metadata=self._metadata
        )

    async def complete(
        self, prompt: Prompt | None, *, timeout: float | None = None, **kwargs: Any
    ) -> Completion:
        result = Completion()
        async for delta in self.generate(prompt, timeout=timeout, **kwargs):
            result.add(delta)
        return result

    async def abort(self, request_id: str, *, timeout: float | None = None) -> None:
        await self._stub.Abort(
            pb.AbortRequest(request_id=request_id), timeout=timeout, metadata=self._metadata
        )

    async def status(self, *, timeout: float | None = None) -> pb.ClusterStatus:
        return await self._stub.GetClusterStatus(
            pb.ClusterStatusRequest(), timeout=timeout, metadata=self._metadata
        )

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
