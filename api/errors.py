"""Error types shared by every part; each maps to exactly one gRPC status code.

The router converts them with `grpc.StatusCode[error.grpc_code]`, so this module stays free of
grpc and torch.
"""

from __future__ import annotations


class PdserveError(Exception):
    """Base class; `grpc_code` is the name of a `grpc.StatusCode` member."""

    grpc_code = "INTERNAL"


class InvalidRequest(PdserveError, ValueError):
    """A request field is malformed; `field` names it."""

    grpc_code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(PdserveError, LookupError):
    grpc_code = "NOT_FOUND"


class CapacityExceeded(PdserveError):
    """The cluster cannot take the request now; nothing was started for it."""

    grpc_code = "RESOURCE_EXHAUSTED"


class TransferFailed(PdserveError):
    """Moving KV between workers failed or timed out; the request falls back to local prefill."""

    grpc_code = "UNAVAILABLE"


class ModelLoadError(PdserveError):
    """A model folder is missing a file or has a key pdserve cannot serve exactly."""

    grpc_code = "FAILED_PRECONDITION"


class Unauthenticated(PdserveError):
    """The RPC lacks a valid `authorization: Bearer <key>` metadata entry."""

    grpc_code = "UNAUTHENTICATED"


class RemoteError(PdserveError):
    """An error another worker reported (a refused reservation), with its gRPC status name."""

    def __init__(self, grpc_code: str, message: str) -> None:
        super().__init__(message)
        self.grpc_code = grpc_code
