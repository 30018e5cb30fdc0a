"""The router's HTTP door (aiohttp, on the router's own event loop): `/metrics` always, and the
OpenAI-compatible API under `/v1/` when asked for. The same TLS certificate and API keys as the
gRPC port; keys guard `/v1/` only, as they guard only `Generation` there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from pdserve.router.auth import ApiKeys, ServerTLS
from pdserve.router.metrics import CONTENT_TYPE
from pdserve.router.openai_http import OpenAIRoutes, error_response
from pdserve.router.status import ask_workers

if TYPE_CHECKING:
    from pdserve.router.router import Router

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class HttpServer:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_http(
    router: Router,
    listen: str,
    *,
    openai: bool,
    tls: ServerTLS | None = None,
    api_keys: Collection[str] = (),
    grace: float = 5.0,
) -> HttpServer:
    """Binds `listen` (host:port; port 0 picks one). A request whose client goes away is
    cancelled, which aborts it on the workers."""
    app = web.Application(
        middlewares=[_json_errors, _api_keys(ApiKeys(api_keys) if api_keys else None)]
    )

    async def metrics(request: web.Request) -> web.Response:
        router.metrics.workers.update(await ask_workers(router))
        return web.Response(body=router.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    app.router.add_get("/metrics", metrics)
    if openai:
        OpenAIRoutes(router).add_to(app)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=grace)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    site = web.TCPSite(runner, host, int(port), ssl_context=tls.ssl_context() if tls else None)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {listen}: {e.strerror or e}") from e
    bound = runner.addresses[0][1]
    logger.info(
        "HTTP on %s:%d (%s, %s)",
        host,
        bound,
        "/metrics and the OpenAI API under /v1/" if openai else "/metrics",
        "TLS" if tls else "plaintext",
    )
    return HttpServer(runner, bound)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, wrong method) in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason, None, None)


def _api_keys(
    keys: ApiKeys | None,
) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if keys is not None and request.path.startswith("/v1/"):
            problem = keys.problem(request.headers.get("Authorization"))
            if problem is not None:
                return error_response(401, problem, "UNAUTHENTICATED", None)
        return await handler(request)

    return check
