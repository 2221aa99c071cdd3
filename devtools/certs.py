"""Test certificates made with the openssl binary: a CA, a server certificate for 127.0.0.1
and client certificates whose CN names a user (docs/security.md shows the same commands)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True, slots=True)
class Pair:
    cert: Path
    key: Path


def _run(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(directory: Path, name: str = "ca") -> Pair:
    """A self-signed CA valid for a day."""
    pair = Pair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    _run("req", "-x509", *_EC, "-keyout", str(pair.key), "-out", str(pair.cert), "-days", "1",
         "-subj", f"/CN=aivmm test {name}")
    return pair


def make_cert(ca: Pair, directory: Path, name: str, cn: str, *,
              san: str = "IP:127.0.0.1,DNS:localhost") -> Pair:
    """A certificate signed by ``ca`` for server and client use, with ``cn`` as its CN."""
    pair = Pair(directory / f"{name}.pem", directory / f"{name}-key.pem")
    csr = directory / f"{name}.csr"
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth,clientAuth\n")
    _run("req", "-new", *_EC, "-keyout", str(pair.key), "-out", str(csr), "-subj", f"/CN={cn}")
    _run("x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey", str(ca.key),
         "-CAcreateserial", "-out", str(pair.cert), "-days", "1", "-extfile", str(ext))
    return pair
