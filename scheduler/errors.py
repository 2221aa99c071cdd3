"""OpenAI-shaped error answers: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import orjson
from aiohttp import web

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "api_error",
    503: "service_unavailable",
    504: "timeout",
}


def error_body(message: str, status: int, code: str | None = None,
               param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI error object."""
    return orjson.dumps({"error": {"message": message, "type": _TYPES.get(status, "api_error"),
                                   "param": param, "code": code}})


def error_response(status: int, message: str, code: str | None = None,
                   param: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """An error response with the OpenAI body and the matching status."""
    return web.Response(status=status, body=error_body(message, status, code, param),
                        content_type="application/json", headers=headers)


def sse_error_event(message: str, code: str = "upstream_stream_broken") -> bytes:
    """An SSE event carrying an OpenAI error, to end a stream that broke half-way."""
    return b"data: " + error_body(message, 502, code) + b"\n\n"
