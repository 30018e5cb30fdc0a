"""Transport security and API keys of the router's gRPC server and HTTP door.

Keys guard the methods of one service (`pdserve.v1.Generation`, and the OpenAI API under `/v1/`
on HTTP); everything else, health, reflection and `/metrics` included, stays open because load
balancers and scrapers probe them without credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pdserve.api.errors import Unauthenticated
from pdserve.router.errors import status_of


@dataclass(frozen=True)
class ServerTLS:
    """The PEM certificate chain and private key the server presents."""

    certificate_chain: bytes
    private_key: bytes = field(repr=False)

    @classmethod
    def from_files(cls, cert: str | Path, key: str | Path) -> ServerTLS:
        return cls(Path(cert).read_bytes(), Path(key).read_bytes())

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.private_key, self.certificate_chain)])

    def ssl_context(self) -> ssl.SSLContext:
        """The same certificate and key for an HTTP server."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        # NOTE: `load_cert_chain` reads only files; they live in a private folder for a moment.
        with tempfile.TemporaryDirectory() as folder:
            cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
            cert.write_bytes(self.certificate_chain)
            key.touch(mode=0o600)
            key.write_bytes(self.private_key)
            context.load_cert_chain(cert, key)
        return context


class ApiKeys:
    """The keys a door accepts."""

    def __init__(self, keys: Collection[str]) -> None:
        if not keys:
            raise ValueError("ApiKeys needs at least one key")
        self._keys = tuple(k.encode() for k in keys)

    def problem(self, authorization: str | None) -> str | None:
        """Why a call with this `authorization` value is refused, or None when it carries a
        known key."""
        if authorization is None:
            return "missing 'authorization: Bearer <API key>'"
        token = bearer_token(authorization)
        token_bytes = (token or "").encode()
        # NOTE: every key is compared, in constant time, so timing reveals neither the key nor
        # which of the keys matched.
        known = False
        for key in self._keys:
            known |= hmac.compare_digest(key, token_bytes)
        if token is None or not known:
            return "invalid API key"
        return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value, or None."""
    if authorization is None:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def key_owner(authorization: str | None) -> str:
    """Who a request acts for, from its `authorization` value: a digest of its API key, so that
    request ids are scoped per key without the router's tables holding keys. "" without one."""
    token = bearer_token(authorization)
    return hashlib.sha256(token.encode()).hexdigest()[:32] if token else ""


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED to calls of `service` that do not carry
    `authorization: Bearer <key>` with one of `keys`."""

    def __init__(self, keys: Collection[str], service: str) -> None:
        self._keys = ApiKeys(keys)
        self._prefix = f"/{service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self._prefix):
            return handler
        problem = self._keys.problem(authorization(details.invocation_metadata or ()))
        return handler if problem is None else _refusal(handler, problem)


def authorization(metadata: Sequence[tuple[str, str]]) -> str | None:
    """The `authorization` value of a gRPC call's metadata."""
    values = [v for k, v in metadata if k == "authorization"]
    return values[0] if values else None


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""
    code, details = status_of(Unauthenticated(message))

    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    shape = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[shape]
    return make(refuse)
