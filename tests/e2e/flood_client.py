"""Sends one serialized `GenerateRequest` many times at once, from a process of its own, so
that the clients' memory and CPU stay out of the router's process (which is the test's).

Usage: python flood_client.py TARGET REQUEST_FILE COUNT TIMEOUT_S
Prints one JSON object: per call, its status code name, seconds from its start to its end,
and the tokens it received.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc

from pdserve.proto import pdserve_pb2 as pb

GENERATE = "/pdserve.v1.Generation/Generate"


async def _call(channel: grpc.aio.Channel, raw: bytes, timeout: float) -> dict:
    call = channel.unary_stream(
        GENERATE,
        request_serializer=lambda b: b,
        response_deserializer=pb.GenerateResponse.FromString,
    )
    start, tokens, code = time.monotonic(), 0, "OK"
    try:
        async for response in call(raw, timeout=timeout):
            tokens += len(response.token_ids)
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    return {"code": code, "seconds": time.monotonic() - start, "tokens": tokens}


async def _flood(target: str, raw: bytes, count: int, timeout: float) -> list[dict]:
    options = [("grpc.max_send_message_length", 16 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        await channel.channel_ready()
        return await asyncio.gather(*(_call(channel, raw, timeout) for _ in range(count)))


def main() -> None:
    target, path, count, timeout = sys.argv[1:5]
    with open(path, "rb") as f:
        raw = f.read()
    print(json.dumps(asyncio.run(_flood(target, raw, int(count), float(timeout)))))


if __name__ == "__main__":
    main()
