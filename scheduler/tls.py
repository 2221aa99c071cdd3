"""The scheduler's TLS listener: a server context from tls_cert/tls_key, re-read on SIGHUP."""

from __future__ import annotations

import logging
import ssl

log = logging.getLogger(__name__)


def tls_context(cert: str, key: str) -> ssl.SSLContext | str:
    """A server context for ``cert`` (PEM chain) and ``key``, or why it cannot be made."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    problem = load(context, cert, key)
    return problem if problem else context


def load(context: ssl.SSLContext, cert: str, key: str) -> str | None:
    """(Re)load the certificate into ``context``; new handshakes use it. None when done."""
    try:
        context.load_cert_chain(cert, key)
    except OSError as err:
        return f"readable tls_cert and tls_key ({err.strerror or err})"
    except ssl.SSLError:
        return f"a PEM certificate chain and its key ({cert} and {key} do not match)"
    return None


def reloader(context: ssl.SSLContext, cert: str, key: str) -> None:
    """What SIGHUP does: load the files again; a failure keeps the old certificate."""
    problem = load(context, cert, key)
    if problem:
        log.error("TLS certificate not reloaded; the old one stays: %s", problem)
    else:
        log.info("TLS certificate reloaded", extra={"cert": cert})
