"""The one parse of an OpenAI request body: its model, and the parsed fields kept on the
request for whatever else needs them (the routing hint, a key's usage chunk, a route's model
swap), so a body is parsed once however many steps look at it."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

# The parsed body of an admitted request (a JSON object with a model).
REQUEST_DATA: web.RequestKey[dict[str, Any]] = web.RequestKey("aivmm_request_data", dict)


def parse_request(body: bytes) -> tuple[dict[str, Any], str] | str:
    """``(the parsed body, its model)`` for a usable body, otherwise why it is not."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return "the request body is not valid JSON"
    if not isinstance(data, dict):
        return "the request body must be a JSON object"
    model = data.get("model")
    if not isinstance(model, str) or not model:
        return "you must provide a model parameter"
    return data, model
