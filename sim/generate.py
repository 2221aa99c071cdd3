"""Deterministic stand-ins for a model's output: readable tokens and stable embeddings.

The same prompt always gives the same answer and the same vector, so tests and the demo can
compare answers across backends and retries.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
from typing import Any

WORDS = (
    "the", "fleet", "answers", "quickly", "every", "backend", "serves", "tokens", "over",
    "one", "endpoint", "while", "simulated", "engines", "stream", "readable", "words", "and",
    "agents", "keep", "their", "records", "fresh", "in", "etcd", "so", "schedulers", "route",
    "each", "request", "to", "a", "ready", "machine",
)


def count_tokens(text: str) -> int:
    """A rough token count: whitespace-separated words (at least 1 for non-empty text)."""
    return len(text.split())


def answer_tokens(prompt: str, n: int) -> list[str]:
    """``n`` tokens answering ``prompt``: words, each but the first with a leading space."""
    digest = hashlib.sha256(prompt.encode()).digest()
    start = digest[0] % len(WORDS)
    step = 1 + digest[1] % 5
    words = [WORDS[(start + i * step) % len(WORDS)] for i in range(n)]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def chat_prompt(messages: Any) -> str:
    """The text of a chat request's messages (string or content-part lists), joined."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list")
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict):
            raise ValueError("messages: each message must be an object")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
        elif content is not None:
            raise ValueError("messages: content must be a string or a list of parts")
    return "\n".join(parts)


def completion_prompt(prompt: Any) -> str:
    """The text of a completion request's prompt (string, list of strings, or token ids)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        return "\n".join(str(p) if not isinstance(p, str) else p for p in prompt)
    raise ValueError("prompt: expected a string or a non-empty list")


def embedding_inputs(value: Any) -> list[str]:
    """The inputs of an embeddings request, as strings (token-id lists hashed as text)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):
            return [repr(value)]
        if all(isinstance(v, str | list) for v in value):
            return [v if isinstance(v, str) else repr(v) for v in value]
    raise ValueError("input: expected a string or a non-empty list")


def embedding(text: str, dim: int) -> list[float]:
    """A unit-length vector of ``dim`` floats derived from a hash of ``text``."""
    blocks = -(-dim * 4 // 32)  # sha256 digests needed for dim float32s
    raw = b"".join(hashlib.sha256(f"{i}:{text}".encode()).digest() for i in range(blocks))
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dim}I", raw[: dim * 4])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def encode_base64(vector: list[float]) -> str:
    """OpenAI's ``encoding_format=base64``: little-endian float32, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
