"""etcd endpoint URLs: one parser for the config check and for the store that dials them."""

from __future__ import annotations

from urllib.parse import urlsplit


def etcd_target(endpoint: str) -> str:
    """``http://host:port`` (or bare ``host:port``) to a gRPC target ``host:port``.

    Raises ValueError for anything the store cannot dial (another scheme, no host, a port
    that is not a number in 1..65535), so a bad URL is a config error, not a crash later.
    """
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    try:
        port = url.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError:
        port = -1
    if url.scheme != "http" or not url.hostname or port == -1 or port == 0 or \
            url.path not in ("", "/"):
        raise ValueError(f"etcd endpoint {endpoint!r}: expected http://HOST:PORT")
    host = f"[{url.hostname}]" if ":" in url.hostname else url.hostname
    return f"{host}:{port or 2379}"
