"""Helpers for worker tests: a decode service's token stream, read as the router reads it."""

from __future__ import annotations

from collections.abc import AsyncIterator

from pdserve.api.messages import StepOutputs
from pdserve.api.token_link import TokenLinkClient
from pdserve.decode_worker.service import DecodeService


async def token_stream(decode: DecodeService) -> AsyncIterator[StepOutputs]:
    """The step outputs of `decode`, over a token link of its own (replacing any earlier)."""
    link = await TokenLinkClient.connect(await decode.token_link())
    try:
        while True:
            yield await link.read()
    finally:
        link.close()
