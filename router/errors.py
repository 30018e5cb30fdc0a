"""The one place where failures become status codes: gRPC ones, and the HTTP ones of the
router's HTTP door (derived from the gRPC code, so both doors agree).

Every error type in `pdserve.api.errors` names its status code; `RequestFailed` carries a code
chosen at run time (a worker's answer, a worker that is gone).
"""

from __future__ import annotations

import logging

import grpc

from pdserve.api.errors import PdserveError

logger = logging.getLogger(__name__)


class RequestFailed(PdserveError):
    """A request failed with the gRPC status named `code` (e.g. a prefill worker's answer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        known = code in grpc.StatusCode.__members__ and code != "OK"
        self.grpc_code = code if known else "INTERNAL"


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for `error`."""
    if isinstance(error, PdserveError):
        return grpc.StatusCode[error.grpc_code], str(error)
    logger.exception("internal error", exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def http_status_of(error: BaseException) -> tuple[int, grpc.StatusCode, str]:
    """The HTTP status, the gRPC status code and the message for `error`."""
    code, message = status_of(error)
    return HTTP_STATUS.get(code.name, 500), code, message
