"""The scheduler's defences at its edge (docs/security.md): a cap on concurrent requests,
JSON-only bodies read within a deadline, security headers on the status page, internal
names kept from clients, and streams ended with an SSE error when the scheduler stops.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import re
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Counter

from scheduler.errors import error_response
from scheduler.netpolicy import networks

log = logging.getLogger(__name__)

BACKEND_HEADER = "x-aivmm-backend"
# Seconds a client refused for overload is told to wait.
OVERLOAD_RETRY_AFTER_S = 1
# Paths that do work for a client (and count against max_concurrent_requests).
CAPPED_PREFIX = "/v1/"


def _hash(pattern: str, page: str) -> str:
    found = re.search(pattern, page, re.S)
    body = found.group(1) if found else ""
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


def page_headers(page: str) -> dict[str, str]:
    """Headers of the status page: a CSP that runs only its own script (by hash) and talks
    only to this origin, no framing, no MIME sniffing, no referrer."""
    csp = ("default-src 'none'; script-src " + _hash(r"<script>(.*?)</script>", page)
           + "; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; "
           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def refuse_content_type(request: web.Request) -> web.Response | None:
    """415 unless the body is JSON: an HTML form (urlencoded, multipart, text/plain) posted
    cross-site must not start a generation."""
    if request.content_type == "application/json":
        return None
    return error_response(415, f"Content-Type must be application/json, not "
                          f"{request.content_type or 'none'}", "unsupported_media_type")


async def body_timed_out(request: web.Request, seconds: float) -> web.Response:
    """408 for a body that did not arrive in ``body_timeout``, then the connection closes
    (aiohttp would otherwise linger reading the rest of the body)."""
    resp = error_response(408, f"the request body did not arrive within {seconds:g}s",
                          "request_timeout")
    resp.force_close()
    await resp.prepare(request)
    await resp.write_eof()
    request.protocol.force_close()
    return resp


class Edge:
    """The concurrency cap and the name hiding, as one middleware and a prepare hook."""

    def __init__(self, registry: object, *, max_concurrent: int, hide_names: bool,
                 metrics_networks: list[str]) -> None:
        self.max_concurrent = max_concurrent
        self.hide_names = hide_names
        self.metrics_networks = networks(metrics_networks)
        self.active = 0
        self.overloaded = Counter(
            "aivmm_scheduler_overload_rejections_total",
            "Requests refused with 503 because max_concurrent_requests were in flight",
            registry=registry)  # type: ignore[arg-type]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path == "/metrics" and self.hide_names and self.metrics_networks \
                and not self._metrics_allowed(request):
            return error_response(403, "metrics are not served to this address", "forbidden")
        if not path.startswith(CAPPED_PREFIX) or not self.max_concurrent:
            return await handler(request)
        if self.active >= self.max_concurrent:
            self.overloaded.inc()
            return error_response(503, "the scheduler is at max_concurrent_requests; retry "
                                  "shortly", "overloaded",
                                  headers={"Retry-After": str(OVERLOAD_RETRY_AFTER_S)})
        self.active += 1
        try:
            return await handler(request)
        finally:
            self.active -= 1

    def _metrics_allowed(self, request: web.Request) -> bool:
        try:
            peer = ipaddress.ip_address(request.remote or "")
        except ValueError:
            return False
        return any(peer in n for n in self.metrics_networks)

    async def on_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.hide_names:
            response.headers.popall(BACKEND_HEADER, None)


def install(app: web.Application, *, max_concurrent: int, hide_names: bool,
            metrics_networks: list[str], backend_networks: list[str], registry: object,
            on_stop: list[object]) -> Edge:
    """Add the middleware and hooks to ``app`` (before it starts); ``on_stop`` callables
    run when the server shuts down (after the drain: they end what is still streaming)."""
    edge = Edge(registry, max_concurrent=max_concurrent, hide_names=hide_names,
                metrics_networks=metrics_networks)
    app.middlewares.append(edge.middleware)
    app.on_response_prepare.append(edge.on_prepare)

    async def stopping(_app: web.Application) -> None:
        for stop in on_stop:
            stop()  # type: ignore[operator]

    app.on_shutdown.append(stopping)

    async def warn(_app: web.Application) -> AsyncIterator[None]:
        if not backend_networks:
            log.warning("backend_networks is not set: backend records may send requests to "
                        "any address but link-local ones; set it to the engines' networks "
                        "(docs/security.md)")
        yield

    app.cleanup_ctx.append(warn)
    return edge
