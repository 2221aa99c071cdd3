"""API key checks: ``Authorization: Bearer <key>`` against plain or ``sha256:<hex>`` keys.

Every configured key is kept as its SHA-256 digest, and the presented key's digest is
compared with each of them in constant time, so neither the comparison nor the number of
keys tried reveals how much of a key was right.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

SHA_PREFIX = "sha256:"


class BadKey(ValueError):
    """A configured key that cannot be used (a bad ``sha256:`` digest)."""


def digest_of(key: str) -> bytes:
    """The SHA-256 digest of a configured key, whether plain or ``sha256:<hex>``."""
    if key.startswith(SHA_PREFIX):
        hexpart = key[len(SHA_PREFIX):].strip().lower()
        try:
            raw = bytes.fromhex(hexpart)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise BadKey(f"'{SHA_PREFIX}…' must be followed by 64 hex digits")
        return raw
    return hashlib.sha256(key.encode()).digest()


def read_keys_file(path: str) -> list[str]:
    """One key per line; blank lines and ``#`` comments are ignored."""
    lines = Path(path).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


class Authenticator:
    """Checks the Authorization header; with no keys configured, everything passes."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [digest_of(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether the header carries one of the configured keys."""
        if not self._digests:
            return True
        if not authorization or authorization[:7].lower() != "bearer ":
            return False
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        ok = False
        for d in self._digests:
            # No early exit: the time taken does not depend on which key matched.
            ok |= hmac.compare_digest(presented, d)
        return ok
