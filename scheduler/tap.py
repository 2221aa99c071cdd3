"""What one request's answer looked like, as the proxy relays it: when its first byte came,
from which backend, and how many output tokens it carried (docs/routes.md: figures).

The proxy calls the hooks of the :class:`Tap` stored on the request under :data:`TAP`
(there is always one for the OpenAI routes); nothing here does I/O or parses JSON. Output
tokens come from the answer's ``usage.completion_tokens`` (a plain body, or a streamed chunk
when the client asked for ``stream_options.include_usage``); a stream without usage is
estimated as its ``data:`` events less ``[DONE]`` and one closing event.
"""

from __future__ import annotations

import re

from aiohttp import web

_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_PROMPT_TOKENS = re.compile(rb'"prompt_tokens"\s*:\s*(\d+)')
# The last this many bytes of a plain body are kept to read its usage, which comes at the
# end (an embeddings answer of a large batch is several MiB before it).
_KEEP_MAX = 1 << 20


class Tap:
    """One request's answer, seen from the relay. Times are the proxy's clock."""

    __slots__ = ("_kept", "backend", "broken", "events", "first_at", "headers", "sse", "start",
                 "usage_prompt", "usage_tokens")

    def __init__(self, start: float) -> None:
        self.start = start
        self.first_at: float | None = None
        self.backend = ""
        self.sse: bool | None = None
        self.events = 0
        self.usage_tokens: int | None = None
        self.usage_prompt: int | None = None
        self.broken = False
        # Response headers to add (a route's x-aivmm-route).
        self.headers: dict[str, str] = {}
        self._kept = bytearray()

    def first_byte(self, now: float, backend: str) -> None:
        """The answer that reaches the client started at ``now`` on ``backend``."""
        self.first_at = now
        self.backend = backend

    def chunk(self, data: bytes) -> None:
        """A piece of the answer as it went to the client."""
        if self.sse is None:
            self.sse = data.lstrip().startswith(b"data:")
        if self.sse:
            # An estimate: a marker split between two pieces is missed (engines write whole
            # events, so pieces rarely split one).
            self.events += data.count(b"data:") - data.count(b"[DONE]")
            if b'"usage"' in data:
                found = _COMPLETION_TOKENS.findall(data)
                if found:
                    self.usage_tokens = int(found[-1])
                prompt = _PROMPT_TOKENS.findall(data)
                if prompt:
                    self.usage_prompt = int(prompt[-1])
        else:
            kept = self._kept
            kept += data
            if len(kept) > _KEEP_MAX:
                del kept[:len(kept) - _KEEP_MAX]

    def output_tokens(self) -> int:
        """The answer's output tokens: its usage, else (a stream) an estimate."""
        if self.usage_tokens is not None:
            return self.usage_tokens
        if self.sse:
            return max(0, self.events - 1)
        found = _COMPLETION_TOKENS.findall(self._kept)
        return int(found[-1]) if found else 0

    def prompt_tokens(self) -> int:
        """The answer's prompt tokens, from its usage (0 when it has none)."""
        if self.sse:
            return self.usage_prompt or 0
        found = _PROMPT_TOKENS.findall(self._kept)
        return int(found[-1]) if found else 0


TAP: web.RequestKey[Tap] = web.RequestKey("aivmm_tap", Tap)
