"""The gRPC face of the router: the `Generation` servicer, health and reflection, `serve()`."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.api.errors import CapacityExceeded, InvalidRequest
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.auth import ApiKeyInterceptor, ServerTLS, authorization, key_owner
from pdserve.router.errors import status_of
from pdserve.router.validation import check_serialized_text_size, reject_unknown_fields

if TYPE_CHECKING:
    from pdserve.router.router import Router

logger = logging.getLogger(__name__)

T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class GenerationServicer:
    """Translates RPCs into `Router` calls and every failure into a status code.

    Requests arrive as raw bytes and are parsed here, so that bytes that are not the RPC's
    message, or that carry a field number this server does not know, get INVALID_ARGUMENT
    like any other malformed request.

    NOTE: `Generate` is served by a handler that reads its one request itself (gRPC's
    stream-stream shape; on the wire the same as the proto's server-streaming RPC). gRPC's
    unary-request path reads every call's message before the handler runs and holds its bytes
    until the call ends, status included; here they are freed once parsed (a refused request
    holds none while its status goes out), and a call refused for overload is never read.
    40 concurrent 4 MB prompts grew the router's peak RSS by 217-236 MiB through the unary
    path, by 146-156 MiB read here, and by 179-268 MiB through the unary path with
    `check_serialized_text_size` (2-core VM, 2026-11-30).

    A request belongs to the API key that created it (`auth.key_owner`): its id is unique per
    key, and only that key can abort or resume it.
    """

    def __init__(self, router: Router) -> None:
        self._router = router

    async def generate(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> None:
        await _answer(context, self._generate(context, time.monotonic()))

    async def abort(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return await _answer(context, self._abort(raw, context))

    async def get_cluster_status(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        return await _answer(context, self._status(raw))

    async def _generate(self, context: grpc.aio.ServicerContext, arrival: float) -> None:
        try:
            # NOTE: an overloaded router refuses a call before it reads the request: the refusal
            # then waits for no receive and copies none of its bytes.
            self._router.refuse_if_overloaded()
            request = self._generate_request(await _read_request(context))
        except (CapacityExceeded, InvalidRequest) as e:
            self._router.metrics.request_failed(e, time.monotonic() - arrival)
            raise
        await self._router.generate(
            request,
            context.write,
            owner=self._owner(context),
            deadline_s=context.time_remaining(),
            arrival=arrival,
        )

    def _generate_request(self, raw: bytes) -> pb.GenerateRequest:
        router = self._router
        check_serialized_text_size(raw, router.tokenizer, router.max_model_len)
        return _parse(pb.GenerateRequest, raw)

    async def _abort(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        request = _parse(pb.AbortRequest, raw)
        await self._router.abort(request.request_id, owner=self._owner(context))
        return pb.AbortResponse(request_id=request.request_id)

    async def _status(self, raw: bytes) -> pb.ClusterStatus:
        _parse(pb.ClusterStatusRequest, raw)
        return await self._router.cluster_status()

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        return key_owner(authorization(context.invocation_metadata() or ()))


async def _read_request(context: grpc.aio.ServicerContext) -> bytes:
    """The one message of a call whose handler reads it (the client sends one)."""
    raw = await context.read()
    if raw is grpc.aio.EOF:
        raise InvalidRequest("request", "the call carries no request message")
    return raw


def _parse(message_type: type, raw: bytes):
    try:
        message = message_type.FromString(raw)
    except DecodeError as e:
        raise InvalidRequest("request", f"not a valid {message_type.__name__}: {e}") from e
    reject_unknown_fields(message)
    return message


async def _answer(context: grpc.aio.ServicerContext, work: Awaitable[T]) -> T:
    """The result of `work`; a failure ends the call with its status code.

    NOTE: the status goes out after the except block, once the failed call's frames (and the
    request they hold) are released: a flood of huge invalid requests then holds one parsed
    request at a time, not every one whose status is still being sent.
    """
    try:
        return await work
    except Exception as e:
        code, message = status_of(e)
    await context.abort(code, message)  # raises


def _handler(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    serialize = pb.GenerateResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.stream_stream_rpc_method_handler(
                servicer.generate, response_serializer=serialize
            ),
            "Abort": grpc.unary_unary_rpc_method_handler(
                servicer.abort, response_serializer=pb.AbortResponse.SerializeToString
            ),
            "GetClusterStatus": grpc.unary_unary_rpc_method_handler(
                servicer.get_cluster_status,
                response_serializer=pb.ClusterStatus.SerializeToString,
            ),
        },
    )


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def set_serving(self, serving: bool) -> None:
        """What the health service answers: SERVING while the cluster can serve requests."""
        status = health_pb2.HealthCheckResponse
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status.SERVING if serving else status.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        """Tells health checkers first, so load balancers drain before RPCs are cut."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    router: Router,
    listen: str,
    *,
    tls: ServerTLS | None = None,
    api_keys: Collection[str] = (),
) -> RunningServer:
    """Binds `listen` (host:port; port 0 picks one) and serves `Generation`, the standard
    health service (SERVING while the router's registry says the cluster can serve) and server
    reflection; over TLS when `tls` is given, and with
    `api_keys` every `Generation` call needs `authorization: Bearer <key>`."""
    interceptors = [ApiKeyInterceptor(api_keys, SERVICE_NAME)] if api_keys else []
    server = grpc.aio.server(interceptors=interceptors)
    server.add_generic_rpc_handlers((_handler(GenerationServicer(router)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    port = _bind(server, listen, tls)
    await server.start()
    running = RunningServer(server, port, health_servicer)
    await running.set_serving(router.registry.serving)
    logger.info(
        "listening on %s:%d (%s, %s)",
        listen.rpartition(":")[0],
        port,
        "TLS" if tls else "plaintext",
        f"{len(api_keys)} API keys" if api_keys else "no API keys",
    )
    return running


def _bind(server: grpc.aio.Server, listen: str, tls: ServerTLS | None) -> int:
    if tls is None:
        port = server.add_insecure_port(listen)
    else:
        try:
            port = server.add_secure_port(listen, tls.credentials())
        except RuntimeError as e:  # grpc reports a bad certificate or key only as this
            raise OSError(
                f"cannot listen on {listen} with TLS: address in use, or the key and the "
                "certificate do not match"
            ) from e
    if port == 0 and not listen.endswith(":0"):
        raise OSError(f"cannot listen on {listen}")
    return port
