"""The OpenAI-compatible endpoints: `GET /v1/models`, `POST /v1/completions` and
`POST /v1/chat/completions`, streamed as server-sent events or answered whole.

Each request takes the same path as a gRPC `Generate` (`Router.generate`); this module only
translates (`openai_protocol`) and maps failures to OpenAI's error objects and HTTP codes.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import web

from pdserve.api.errors import InvalidRequest, NotFound
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.auth import key_owner
from pdserve.router.errors import http_status_of
from pdserve.router.openai_protocol import Answer, OpenAIRequest, openai_param, parse_request

if TYPE_CHECKING:
    from pdserve.router.router import Router

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


def error_response(status: int, message: str, code: str | None, param: str | None) -> web.Response:
    """OpenAI's error object: `param` names the offending field, `code` is the gRPC status
    name the same failure gets on the gRPC port."""
    return web.json_response({"error": _error(status, message, code, param)}, status=status)


def _error(status: int, message: str, code: str | None, param: str | None) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"message": message, "type": kind, "param": param, "code": code}


def _failure(error: Exception, parsed: OpenAIRequest | None) -> tuple[int, dict[str, Any]]:
    """The HTTP status and error object of a failed request; an invalid field is named as
    the client named it."""
    status, code, message = http_status_of(error)
    param = "model" if isinstance(error, UnknownModel) else None
    if isinstance(error, InvalidRequest):
        param = openai_param(error.field, parsed)
        message = f"{param}: {message.removeprefix(f'{error.field}: ')}"
    return status, _error(status, message, code.name, param)


class UnknownModel(NotFound):
    """The body names a model this router does not serve."""


def _owner(request: web.Request) -> str:
    """Request ids are scoped to the API key, as at the gRPC door (`auth.key_owner`)."""
    return key_owner(request.headers.get("Authorization"))


def _sse(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class OpenAIRoutes:
    def __init__(self, router: Router) -> None:
        self._router = router
        self._created = int(time.time())

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)

    async def models(self, request: web.Request) -> web.Response:
        model = {
            "id": self._router.model_name,
            "object": "model",
            "created": self._created,
            "owned_by": "pdserve",
            "max_model_len": self._router.max_model_len,
            # pdserve's own: what token-id prompts may hold (`pdserve bench` reads it)
            "vocab_size": self._router.vocab_size,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = time.monotonic()
        request_id = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        headers = {"X-Request-Id": request_id}
        parsed = None
        try:
            body = await _json(request)
            self._check_model(body)
            parsed = parse_request(body, chat=chat, request_id=request_id)
            answer = Answer(parsed, self._router.model_name, self._router.tokenizer)
            if parsed.stream:
                return await self._stream(request, parsed, answer, headers, arrival)

            async def add(response: pb.GenerateResponse) -> None:
                answer.add(response)

            await self._router.generate(parsed.request, add, owner=_owner(request), arrival=arrival)
            return web.json_response(answer.whole(), headers=headers)
        except (ConnectionError, web.HTTPException):
            raise
        except Exception as e:
            status, error = _failure(e, parsed)
            return web.json_response({"error": error}, status=status, headers=headers)

    async def _stream(
        self,
        request: web.Request,
        parsed: OpenAIRequest,
        answer: Answer,
        headers: dict[str, str],
        arrival: float,
    ) -> web.StreamResponse:
        """Opens the event stream with the first response, so a request refused before any
        token gets a plain HTTP error; a failure after that is the stream's last event."""
        stream = web.StreamResponse(headers={**_SSE_HEADERS, **headers})

        async def send(response: pb.GenerateResponse) -> None:
            if not stream.prepared:
                await stream.prepare(request)
            chunk = answer.chunk(response)
            if chunk is not None:
                await stream.write(_sse(chunk))

        try:
            await self._router.generate(
                parsed.request, send, owner=_owner(request), arrival=arrival
            )
        except ConnectionError:
            raise
        except Exception as e:
            if not stream.prepared:
                raise
            await stream.write(_sse({"error": _failure(e, parsed)[1]}))
        else:
            if parsed.include_usage:
                await stream.write(_sse(answer.usage_chunk()))
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    def _check_model(self, body: Any) -> None:
        """An unknown model is NOT_FOUND; none given means the one served."""
        model = body.get("model") if isinstance(body, dict) else None
        if model is None or model == self._router.model_name:
            return
        if not isinstance(model, str):
            raise InvalidRequest("model", "must be a string")
        served = self._router.model_name
        raise UnknownModel(f"model: {model!r} is not served here; this server serves {served!r}")


async def _json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidRequest("body", f"not valid JSON: {e}") from None
