"""The request id on every log line about a request.

`Router.generate` sets `REQUEST_ID` for the request's task; tasks it starts (the prefill call,
the aborts) inherit it, so their lines carry it too. `RequestIdFilter` copies it onto each
record and `RequestLogFormatter` appends ` request_id=<id>` to the lines that have one.
"""

from __future__ import annotations

import logging
from contextvars import ContextVar

REQUEST_ID: ContextVar[str] = ContextVar("pdserve_request_id", default="")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class RequestLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", "")
        return f"{line} request_id={request_id}" if request_id else line


def install(handler: logging.Handler, fmt: str) -> None:
    """Makes `handler` write the request id of the lines that have one."""
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(RequestLogFormatter(fmt))
