"""The gRPC face of the router: the `Generation` servicer, health and reflection, `serve()`."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdserve.api.errors import InvalidRequest
from pdserve.proto import pdserve_pb2 as pb
from pdserve.router.auth import ApiKeyInterceptor, ServerTLS
from pdserve.router.errors import status_of

if TYPE_CHECKING:
    from pdserve.router.router import Router

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name


class GenerationServicer:
    """Translates RPCs into `Router` calls and every failure into a status code.

    Requests arrive as raw bytes and are parsed here, so that bytes that are not a
    `GenerateRequest` get INVALID_ARGUMENT like any other malformed request.
    """

    def __init__(self, router: Router) -> None:
        self._router = router

    async def generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            await self._router.generate(_parse(pb.GenerateRequest, raw), context.write)
        except Exception as e:
            await _abort(context, e)

    async def abort(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        try:
            request = _parse(pb.AbortRequest, raw)
            await self._router.abort(request.request_id)
            return pb.AbortResponse(request_id=request.request_id)
        except Exception as e:
            await _abort(context, e)

    async def get_cluster_status(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        try:
            _parse(pb.ClusterStatusRequest, raw)
            return await self._router.cluster_status()
        except Exception as e:
            await _abort(context, e)


def _parse(message_type: type, raw: bytes):
    try:
        return message_type.FromString(raw)
    except DecodeError as e:
        raise InvalidRequest("request", f"not a valid {message_type.__name__}: {e}") from e


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> NoReturn:
    code, message = status_of(error)
    await context.abort(code, message)


def _handler(servicer: GenerationServicer) -> grpc.GenericRpcHandler:
    serialize = pb.GenerateResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Generate": grpc.unary_stream_rpc_method_handler(
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
