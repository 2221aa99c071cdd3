"""Which backend records the scheduler may route to (docs/security.md).

etcd is the root of trust, but a record is still checked where it is read: its ``url`` must
be ``http(s)://HOST:PORT`` with nothing else (no user, path, query or fragment), ``HOST`` an
address in ``backend_networks`` when those are set (a host name is refused then: it could
resolve anywhere), and never a link-local address (cloud metadata services live there)
unless a network names it; ``api_path`` must be a plain ``/vN``. Anything else is skipped
and counted like an unparsable record.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_API_PATH = re.compile(r"^/v[0-9]{1,3}$")
_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


def cidr_list(value: Any) -> str | None:
    """Config check: a list of CIDRs such as 10.0.0.0/8 or fd00::/8."""
    try:
        for item in value:
            ipaddress.ip_network(item, strict=False)
    except ValueError:
        return "networks in CIDR form, such as 10.0.0.0/8 or fd00::/8"
    return None


def networks(cidrs: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


def backend_problem(url: str, api_path: str, allowed: Sequence[Network]) -> str | None:
    """Why a backend record's ``url`` and ``api_path`` must not be routed to, or None."""
    if not _API_PATH.match(api_path):
        return f"api_path {api_path!r} is not a plain /vN"
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError:
        return f"url {url!r} is not http(s)://HOST:PORT"
    if (u.scheme not in ("http", "https") or not u.hostname or port is None or u.username
            or u.password or u.path not in ("", "/") or u.query or u.fragment
            or "#" in url or "?" in url):
        return f"url {url!r} is not http(s)://HOST:PORT"
    try:
        address = ipaddress.ip_address(u.hostname)
    except ValueError:
        if allowed:
            return f"url host {u.hostname!r} is a name; backend_networks admits addresses only"
        return None
    if allowed:
        if not any(address in n for n in allowed):
            return f"url host {address} is outside backend_networks"
        return None
    if any(address in n for n in _LINK_LOCAL):
        return f"url host {address} is link-local (set backend_networks to allow it)"
    return None
