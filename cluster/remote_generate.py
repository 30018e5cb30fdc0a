"""`pdserve generate --server HOST:PORT`: one prompt through a running cluster."""

from __future__ import annotations

import dataclasses
import json
import sys

import grpc

from pdserve.api.client import Client, Completion
from pdserve.api.sampling import SamplingParams


def generate_remote(
    server: str,
    prompt: str,
    params: SamplingParams,
    as_json: bool,
    *,
    api_key: str | None = None,
    root_cert: str | None = None,
) -> int:
    """Streams the completion to stdout (after the prompt), or with `as_json` prints one JSON
    object with the same keys as the in-process `pdserve generate --json`, plus usage."""
    result = Completion()
    with Client(server, api_key=api_key, root_cert=root_cert) as client:
        if not as_json:
            print(prompt, end="", flush=True)
        try:
            for delta in client.generate(prompt, **params.to_dict()):
                result.add(delta)
                if not as_json:
                    print(delta.text, end="", flush=True)
        except grpc.RpcError as e:
            if not as_json:
                print()
            print(f"pdserve generate: {e.code().name}: {e.details()}", file=sys.stderr)
            return 2 if e.code() == grpc.StatusCode.INVALID_ARGUMENT else 1
    if as_json:
        print(
            json.dumps(
                {
                    "request_id": result.request_id,
                    "prompt_token_ids": result.prompt_token_ids,
                    "token_ids": result.token_ids,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "timings": result.timings,
                    "usage": dataclasses.asdict(result.usage),
                }
            )
        )
    else:
        print()
    return 0
