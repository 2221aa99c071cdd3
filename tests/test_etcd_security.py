"""etcd security against a real etcd (docs/security.md): mutual TLS, users and passwords,
and the least-privilege roles of ``aivmmctl etcd-roles``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from common.config import ConfigError, load
from common.store import AuthFailed, EtcdSecurity, EtcdStore, StoreError, StoreUnavailable
from ctl import etcdroles
from ctl.main import main as ctl_main
from devtools.certs import Pair, make_ca, make_cert
from devtools.services import EtcdServer, EtcdTls
from scheduler.config import SchedulerConfig

P = "/aivmm/v1"


class Certs:
    def __init__(self, d: Path) -> None:
        self.dir = d
        self.ca = make_ca(d)
        self.server = make_cert(self.ca, d, "server", "etcd")
        self.client = make_cert(self.ca, d, "client", "aivmm-client")
        self.other_ca = make_ca(d, "other-ca")
        self.stranger = make_cert(self.other_ca, d, "stranger", "stranger")

    def security(self, pair: Pair | None = None, user: str | None = None,
                 password: str | None = None, ca: Path | None = None) -> EtcdSecurity:
        pair = self.client if pair is None else pair
        return EtcdSecurity(ca=(ca or self.ca.cert).read_bytes(), cert=pair.cert.read_bytes(),
                            key=pair.key.read_bytes(), user=user, password=password)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_etcd(certs: Certs) -> Iterator[EtcdServer]:
    """An etcd that speaks only TLS and demands a client certificate of our CA; its simple
    tokens expire after 2 s idle, so that renewing one is tested too."""
    server = EtcdServer(tls=EtcdTls(certs.ca.cert, certs.server.cert, certs.server.key,
                                    certs.client.cert, certs.client.key),
                        extra_args=("--auth-token-ttl", "2"))
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def passwords(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("passwords")


@pytest.fixture
async def admin(tls_etcd: EtcdServer, certs: Certs) -> AsyncIterator[EtcdStore]:
    async with EtcdStore([tls_etcd.url], security=certs.security(), timeout=3) as store:
        yield store


def _ctl(tls_etcd: EtcdServer, certs: Certs, *args: str, user: str | None = None,
         password_file: Path | None = None) -> int:
    base = ["--etcd", tls_etcd.url, "--prefix", P, "--etcd-ca", str(certs.ca.cert),
            "--etcd-cert", str(certs.client.cert), "--etcd-key", str(certs.client.key)]
    if user:
        base += ["--etcd-user", user, "--etcd-password-file", str(password_file)]
    return ctl_main([*base, *args])


# The tests below run in this order: TLS first, then roles and auth enabled (for good).

async def test_mutual_tls_roundtrip(admin: EtcdStore) -> None:
    await admin.put(f"{P}/tls-check", b"x")
    assert await admin.get(f"{P}/tls-check") == b"x"


@pytest.mark.parametrize("who", ["no client certificate", "certificate of another CA",
                                 "server of another CA", "plain http"])
async def test_tls_refusals(tls_etcd: EtcdServer, certs: Certs, who: str) -> None:
    url = tls_etcd.url
    if who == "no client certificate":
        security = EtcdSecurity(ca=certs.ca.cert.read_bytes())
    elif who == "certificate of another CA":
        security = certs.security(certs.stranger)
    elif who == "server of another CA":
        security = certs.security(ca=certs.other_ca.cert)
    else:
        security, url = certs.security(), url.replace("https://", "http://")
    async with EtcdStore([url], security=security, timeout=1) as store:
        with pytest.raises(StoreUnavailable):
            await store.get(f"{P}/tls-check")


def test_role_grants_are_least_privilege() -> None:
    roles = etcdroles.role_grants(P, ["n1"])
    agent = {(g.key, g.kind, g.prefix) for g in roles["aivmm-agent-n1"]}
    assert (f"{P}/nodes/n1", "readwrite", False) in agent  # exact: not n10
    assert not any(k.startswith(f"{P}/deployments")
                   or (k.startswith(f"{P}/drain/") and w != "read") for k, w, _ in agent)
    scheduler = {(g.key, g.kind) for g in roles["aivmm-scheduler"]}
    assert (f"{P}/", "read") in scheduler
    assert not any(k.startswith((f"{P}/backends", f"{P}/nodes", f"{P}/deployments"))
                   for k, _ in scheduler)


async def test_roles_and_auth(tls_etcd: EtcdServer, certs: Certs, passwords: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(
        _ctl, tls_etcd, certs, "etcd-roles", "--node", "n1", "--node", "n2",
        "--password-dir", str(passwords), "--enable-auth") == 0
    assert "authentication enabled" in capsys.readouterr().out
    assert (passwords / "root").stat().st_mode & 0o077 == 0

    def login(user: str, password: str | None = None) -> EtcdStore:
        pw = password if password is not None else (passwords / user).read_text().strip()
        return EtcdStore([tls_etcd.url], timeout=3,
                         security=certs.security(user=user, password=pw))

    async def can(store: EtcdStore, op: str, key: str) -> bool:
        try:
            if op == "put":
                await store.put(key, b"{}")
            else:
                await store.get_prefix(key)
        except StoreError as err:
            assert "PERMISSION_DENIED" in str(err), err
            return False
        return True

    async with login("aivmm-agent-n1") as agent:
        assert await can(agent, "put", f"{P}/nodes/n1")
        assert await can(agent, "put", f"{P}/backends/n1/b")
        assert await can(agent, "put", f"{P}/audit/0000000000000000001-abcdef")
        assert await can(agent, "get", f"{P}/assignments/n1/")
        assert await can(agent, "get", f"{P}/drain/n1")
        # Another node's keys, any deployment, drain keys, routes: refused.
        for key in (f"{P}/nodes/n2", f"{P}/nodes/n10", f"{P}/backends/n2/b",
                    f"{P}/deployments/d", f"{P}/drain/n1", f"{P}/assignments/n1/d-0",
                    f"{P}/routes/r", f"{P}/placer/leader"):
            assert not await can(agent, "put", key), key
        assert not await can(agent, "get", f"{P}/assignments/n2/")
        assert not await can(agent, "get", f"{P}/deployments/")
        # The token expires after 2 s idle (--auth-token-ttl): the store logs in again.
        await asyncio.sleep(3)
        assert await can(agent, "put", f"{P}/nodes/n1")

    async with login("aivmm-scheduler") as sched:
        assert await can(sched, "get", f"{P}/backends/")
        assert await can(sched, "put", f"{P}/assignments/n1/d-0")
        assert await can(sched, "put", f"{P}/load/r1")
        assert not await can(sched, "put", f"{P}/backends/n1/evil")
        assert not await can(sched, "put", f"{P}/deployments/d")
        assert not await can(sched, "put", f"{P}/drain/n1")

    async with login("aivmm-operator") as operator:
        assert await can(operator, "put", f"{P}/deployments/d")
        # A watch created after the token expired, with no call before it to renew the
        # token (a broken watch resuming from its revision), logs in again too: it was
        # refused for ever while nothing else used the connection.
        async with login("aivmm-scheduler") as sched:
            rev = (await sched.get_prefix(f"{P}/deployments/")).revision
            await asyncio.sleep(3)  # past --auth-token-ttl, idle

            async def first_event() -> str:
                async for event in sched.watch_prefix(f"{P}/deployments/", rev + 1):
                    return event.key
                return ""
            # From rev + 1: the put is seen whether it lands before the watch exists or after.
            watching = asyncio.create_task(first_event())
            await operator.put(f"{P}/deployments/after-expiry", b"{}")
            assert await asyncio.wait_for(watching, 10) == f"{P}/deployments/after-expiry"

    async with login("aivmm-agent-n1", "wrong") as bad:
        with pytest.raises(AuthFailed):
            await bad.get(f"{P}/nodes/n1")

    # aivmmctl as an agent: a deploy is refused with one line, exit 1; as operator it works.
    assert await asyncio.to_thread(
        _ctl, tls_etcd, certs, "deploy", "d2", "--model", "m", "--engine", "sim",
        user="aivmm-agent-n1", password_file=passwords / "aivmm-agent-n1") == 1
    assert "etcd refused the request" in capsys.readouterr().err
    assert await asyncio.to_thread(
        _ctl, tls_etcd, certs, "drain", "n1", user="aivmm-operator",
        password_file=passwords / "aivmm-operator") == 0
    # Without credentials nothing is readable any more.
    async with EtcdStore([tls_etcd.url], security=certs.security(), timeout=3) as anon:
        with pytest.raises(StoreError):
            await anon.get(f"{P}/nodes/n1")


# -- config: clear exit-2 errors --------------------------------------------------------------

def _load(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> SchedulerConfig:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return load(SchedulerConfig, path, explicit=True, environ=environ or {})


def test_config_security_errors(tmp_path: Path, certs: Certs) -> None:
    ca, cert, key = certs.ca.cert, certs.client.cert, certs.client.key
    url = 'etcd = ["https://127.0.0.1:2379"]\n'
    ok = _load(tmp_path, url + f'etcd_ca = "{ca}"\netcd_cert = "{cert}"\netcd_key = "{key}"\n')
    security = ok.etcd_security()
    assert security is not None and security.cert == cert.read_bytes()
    cases = {
        f'etcd_ca = "{tmp_path}/missing.pem"\n': "etcd_ca",
        f'etcd_cert = "{cert}"\netcd_key = "{certs.stranger.key}"\n': "do not match",
        f'etcd_cert = "{cert}"\n': "etcd_key",
        f'etcd_ca = "{key}"\n': "not one",
        f'etcd_user = "u"\netcd_password_file = "{tmp_path}/nope"\n': "readable",
    }
    for text, expected in cases.items():
        with pytest.raises(ConfigError) as err:
            _load(tmp_path, url + text)
        assert expected in str(err.value), (text, str(err.value))
    with pytest.raises(ConfigError, match="https://"):
        _load(tmp_path, f'etcd_ca = "{ca}"\n')  # a CA over plain http
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    c = _load(tmp_path, url + 'etcd_user = "u"\n',
              {"AIVMM_ETCD_PASSWORD_FILE": str(pw)})
    sec = c.etcd_security()
    assert sec is not None and sec.password == "s3cret" and "s3cret" not in repr(sec)
    c = _load(tmp_path, url + 'etcd_user = "u"\n', {"AIVMM_ETCD_PASSWORD": "envpw"})
    sec = c.etcd_security({"AIVMM_ETCD_PASSWORD": "envpw"})
    assert sec is not None and sec.password == "envpw"
    with pytest.raises(ConfigError, match="etcd_password_file"):
        c.etcd_security({})  # a user and no password anywhere


def test_config_error_shows_no_key_material(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, 'api_keys = ["sha256:deadbeefsecret"]\n')
    assert "deadbeefsecret" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, "api_keys = 12345678\n")
    assert "12345678" not in str(err.value)


def test_ctl_flag_errors(tmp_path: Path, certs: Certs,
                         capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_main(["--etcd", "https://127.0.0.1:1", "--etcd-cert", str(certs.client.cert),
                     "--etcd-key", str(certs.stranger.key), "status"]) == 2
    assert "--etcd-key" in capsys.readouterr().err
