"""Serving prometheus-client metrics from aiohttp, one registry per application.

No module-level registry: each daemon (and each test instance) owns its own
``CollectorRegistry``, kept in the app under :data:`REGISTRY`.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry", CollectorRegistry)


async def handle_metrics(request: web.Request) -> web.Response:
    """``GET /metrics`` in Prometheus text format."""
    body = generate_latest(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def install(app: web.Application, registry: CollectorRegistry) -> None:
    """Attach ``registry`` to ``app`` and route ``GET /metrics`` to it."""
    app[REGISTRY] = registry
    app.router.add_get("/metrics", handle_metrics)
