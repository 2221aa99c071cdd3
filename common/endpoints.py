"""etcd endpoint URLs: one parser for the config check and for the store that dials them."""

from __future__ import annotations

from urllib.parse import urlsplit


def etcd_target(endpoint: str) -> str:
    """``http(s)://host:port`` (or bare ``host:port``) to a gRPC target ``host:port``.

    Raises ValueError for anything the store cannot dial (another scheme, no host, a port
    that is not a number in 1..65535), so a bad URL is a config error, not a crash later.
    ``https://`` endpoints are dialled with TLS (docs/security.md).
    """
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = url.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        port = -1
    if url.scheme not in ("http", "https") or not url.hostname or port == -1 or port == 0 or \
            url.path not in ("", "/"):
        raise ValueError(f"etcd endpoint {endpoint!r}: expected http(s)://HOST:PORT")
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{host}:{port or 2379}"


def is_tls(endpoint: str) -> bool:
    """Whether ``endpoint`` is dialled with TLS (an ``https://`` URL)."""
    return endpoint.startswith("https://")
