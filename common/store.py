"""The etcd store both daemons use; the only module that imports the etcd client library.

It speaks etcd's v3 gRPC API through the generated stubs of ``aetcd.rpc`` on a
``grpc.aio`` channel of its own, rather than through ``aetcd.Client``: the client
multiplexes every watch over one shared stream whose failure handling is all-or-nothing,
and its lease refresh leaves a keep-alive stream open. Owning the calls gives each
request a deadline, each watch its own stream that ends when its consumer stops, and a
single place that decides when to fail over. See docs/store.md for the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import grpc
from aetcd import rpc

from common.backoff import Backoff
from common.endpoints import etcd_target, is_tls

log = logging.getLogger(__name__)

T = TypeVar("T")

# Failures that say "this endpoint did not answer", as opposed to "etcd refused the request".
_UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # gRPC's default reconnect backoff grows to 120 s; a restarted etcd must be found sooner.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # Pings on open streams find a frozen or cut-off etcd that never closes the TCP
    # connection; etcd drops clients pinging more often than every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # By default gRPC stops pinging an idle stream after two pings, and recent versions
    # give a ping a minute to be answered: an idle watch would not notice a frozen etcd.
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_time_between_pings_ms", 10_000),
    ("grpc.http2.ping_timeout_ms", 5_000),
    # A snapshot of many records can exceed gRPC's 4 MiB default.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)


class StoreError(Exception):
    """etcd answered but refused the request (a bug or a misconfiguration, not an outage)."""


class StoreUnavailable(StoreError):
    """No etcd endpoint answered (all were tried); callers retry with backoff."""


class StoreClosed(StoreError):
    """The store was closed; nothing more will be served by it."""


class LeaseLost(StoreError):
    """The lease expired or was revoked; the owner must grant a new one and re-put its keys."""


class Compacted(StoreError):
    """The requested start revision was compacted; history starts at ``revision``."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted: history starts at {revision}")
        self.revision = revision


class AuthFailed(StoreError):
    """etcd refused the credentials (unknown user, wrong password, certificate not trusted)."""


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """How to prove who we are to etcd (docs/security.md).

    ``ca``/``cert``/``key`` are PEM bytes for ``https://`` endpoints: the CA that signed
    etcd's server certificate (None: the system's roots), and this client's certificate and
    key for mutual TLS. ``user``/``password``: etcd's own authentication; the token it
    returns is sent as metadata on every call and renewed when etcd says it expired.
    """

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Permission:
    """One grant of an etcd role: ``key`` alone, or every key under it (``prefix``)."""

    key: str
    kind: Literal["read", "write", "readwrite"]
    prefix: bool = True


_PERM_TYPES = {"read": 0, "write": 1, "readwrite": 2}
# etcd's answer when a simple token expired (--auth-token-ttl, 300 s idle by default).
_TOKEN_EXPIRED = ("invalid auth token", "user name is empty")


class _Authed:
    """A stub whose every call carries the connection's auth token as metadata."""

    def __init__(self, stub: Any, conn: _Conn) -> None:
        self._stub = stub
        self._conn = conn

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._stub, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            if self._conn.token is not None:
                kwargs["metadata"] = (("token", self._conn.token),)
            return method(*args, **kwargs)

        return call


class _Retry(Exception):
    """This endpoint gave no usable answer; try the next one."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0


@dataclass(frozen=True, slots=True)
class Compare:
    """One condition of a transaction, on a key's revisions or value.

    ``Compare.created(key, 0)`` holds while the key is absent; ``Compare.created(key, r)``
    while the key is the one created at revision ``r`` (an election's fencing token: a key
    deleted and created again by someone else has a newer create revision).
    """

    key: str
    target: Literal["create", "mod", "value"]
    expected: int | bytes

    @classmethod
    def created(cls, key: str, revision: int) -> Compare:
        return cls(key, "create", revision)

    @classmethod
    def modified(cls, key: str, revision: int) -> Compare:
        """Holds while ``key`` was last written at ``revision`` (0: the key is absent)."""
        return cls(key, "mod", revision)

    def request(self) -> Any:
        c = rpc.Compare(key=self.key.encode(), result=rpc.Compare.EQUAL)
        if self.target == "create":
            c.target = rpc.Compare.CREATE
            c.create_revision = int(self.expected)
        elif self.target == "mod":
            c.target = rpc.Compare.MOD
            c.mod_revision = int(self.expected)
        else:
            c.target = rpc.Compare.VALUE
            c.value = bytes(self.expected)
        return c


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key under a prefix at one revision."""

    revision: int
    items: list[KeyValue]


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes  # b"" for a delete
    revision: int  # the mod revision of this change


@dataclass(frozen=True, slots=True)
class Reset:
    """The consumer must replace its whole view with this snapshot (start, or compaction)."""

    snapshot: Snapshot


@dataclass(frozen=True, slots=True)
class _WatchBatch:
    """One watch response: the events of whole revisions, or a progress mark."""

    events: list[Event]
    created: bool
    revision: int  # header revision: for a progress mark, all changes up to it were sent
    cluster_id: int


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # etcd's "every key from here on"


def _key(raw: bytes) -> str:
    # A foreign, non-UTF-8 key under our prefix must not stop a daemon.
    return raw.decode("utf-8", "replace")


class _Conn:
    """One gRPC channel to one endpoint, with etcd's stubs over it."""

    def __init__(self, endpoint: str, security: EtcdSecurity | None = None) -> None:
        self.endpoint = endpoint
        self.security = security or EtcdSecurity()
        target = etcd_target(endpoint)
        if is_tls(endpoint):
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.security.ca, private_key=self.security.key,
                certificate_chain=self.security.cert)
            self.channel = grpc.aio.secure_channel(target, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = rpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        self.token: str | None = None
        self.kv = _Authed(rpc.KVStub(self.channel), self)
        self.lease = _Authed(rpc.LeaseStub(self.channel), self)
        self.watch = _Authed(rpc.WatchStub(self.channel), self)
        self.auth = _Authed(rpc.AuthStub(self.channel), self)
        self.answered = False  # once true, a failure may be a stale TCP connection

    @property
    def needs_token(self) -> bool:
        return self.security.user is not None and self.token is None

    async def authenticate(self, deadline: float) -> None:
        """Trade the user name and password for a token (every call then carries it)."""
        req = rpc.AuthenticateRequest(name=self.security.user or "",
                                      password=self.security.password or "")
        try:
            resp = await rpc.AuthStub(self.channel).Authenticate(req, timeout=deadline)
        except grpc.aio.AioRpcError as err:
            if err.code() in _UNREACHABLE:
                raise
            raise AuthFailed(f"etcd authentication as {self.security.user!r} failed: "
                             f"{err.details()}") from None
        self.token = str(resp.token)

    async def close(self) -> None:
        await self.channel.close()


class _Stream:
    """A bidirectional gRPC call that, once ended, leaves no grpc task running behind it.

    grpc.aio runs a helper task per streaming call until the C core reports the call's
    final status, which comes a few milliseconds after a local cancel. ``end`` cancels the
    call and waits (briefly, bounded) for that task, so a stopped watch is truly stopped.
    The task is recognised by its name among the tasks started while the call opened; if
    grpc renames it, ``end`` simply stops waiting for it.
    """

    _HELPER = "_handle_status_once_received"
    _HELPER_WAIT_S = 1.0

    def __init__(self, method: Callable[..., Any], timeout: float | None = None) -> None:
        self._before: set[asyncio.Task[Any]] | None = asyncio.all_tasks()
        self.call = method(timeout=timeout)
        self._helpers: list[asyncio.Task[Any]] = []

    def _note_helpers(self) -> None:
        if self._before is not None:
            self._helpers = [
                t for t in asyncio.all_tasks() - self._before
                if getattr(t.get_coro(), "__qualname__", "").endswith(self._HELPER)]
            self._before = None

    async def open(self, request: Any, within: float) -> None:
        """Send the first request; by then grpc has started the call and its helper.

        grpc.aio's first write waits for the call's initial metadata to go out, on an event
        nothing sets if the call ends first (its channel closed by another caller's failover
        at that moment), and the call's deadline does not end that wait. So the write is
        raced against the call's end (then :class:`_Retry`, at once) and bounded by
        ``within`` seconds (then TimeoutError).
        """
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_end(_: object) -> None:
            if not ended.done():
                ended.set_result(None)
        self.call.add_done_callback(on_end)
        write = asyncio.ensure_future(self.call.write(request))
        try:
            await asyncio.wait({write, ended}, timeout=within,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not write.done():
                write.cancel()
                await asyncio.gather(write, return_exceptions=True)
        if not write.done() or write.cancelled():
            if self.call.done():
                raise _Retry("stream ended before it opened")
            raise TimeoutError(f"stream not open after {within:g}s")
        try:
            write.result()
        except asyncio.InvalidStateError as err:  # ended before it was opened
            raise _Retry(f"stream ended before it opened: {err}") from None
        self._note_helpers()

    async def end(self) -> None:
        self.call.cancel()
        self._note_helpers()
        pending = [t for t in self._helpers if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self._HELPER_WAIT_S)


class EtcdStore:
    """An asyncio etcd v3 client over a list of endpoints, failing over between them.

    Calls go to one endpoint at a time. When it does not answer (unavailable, or past the
    ``timeout`` deadline every attempt carries) the store moves to the next endpoint on a
    fresh channel and retries the call there, once per endpoint (plus one retry on a fresh
    channel when the failing one had worked before: a restarted etcd leaves it stale). When
    none answers the call raises :class:`StoreUnavailable`. Retried writes may be applied
    twice; every write here is idempotent in effect.

    Health: ``connected`` is ``False`` until etcd first answers, then says whether the last
    exchange with etcd (a call, or a watch stream) succeeded; ``last_error`` says why not.
    ``on_state(connected)`` is called on every change, e.g. to set a gauge; it must not
    block. ``retry_initial``/``retry_max`` bound the jittered exponential backoff that
    :meth:`sync_prefix` waits between attempts while etcd is away.
    """

    # What a store made without ``security`` uses: set once by a command-line process
    # (aivmmctl) from its flags, so that every store it opens presents the same credentials.
    default_security: EtcdSecurity | None = None

    def __init__(
        self,
        endpoints: list[str],
        *,
        timeout: float = 5.0,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        on_state: Callable[[bool], None] | None = None,
        security: EtcdSecurity | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        for endpoint in endpoints:
            etcd_target(endpoint)  # reject a malformed URL now, not at the first call
        self._endpoints = list(endpoints)
        self._security = security if security is not None else EtcdStore.default_security
        self._timeout = timeout
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        self._on_state = on_state
        self._index = 0
        self._conn: _Conn | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self._connected = False
        self.last_error: str | None = None

    # -- connection ------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        return self._endpoints[self._index]

    @property
    def connected(self) -> bool:
        return self._connected

    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        self.last_error = error
        if connected == self._connected:
            return
        self._connected = connected
        if connected:
            log.info("etcd reachable", extra={"endpoint": self.endpoint})
        else:
            log.warning("etcd unreachable", extra={"error": error})
        if self._on_state is not None:
            self._on_state(connected)

    async def connect(self) -> None:
        """Open the channel to the first endpoint; it connects lazily, so this never waits."""
        self._current()

    async def close(self) -> None:
        """Close the channel: in-flight calls and watches end, later calls raise StoreClosed."""
        self._closed = True
        async with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _current(self) -> _Conn:
        if self._closed:
            raise StoreClosed("the etcd store is closed")
        if self._conn is None:
            self._conn = _Conn(self._endpoints[self._index], self._security)
        return self._conn

    async def _failover(self, failed: _Conn) -> None:
        """Replace ``failed`` by a channel to the next endpoint, once however many noticed."""
        async with self._lock:
            if self._conn is not failed:
                return  # another caller already moved on
            self._index = (self._index + 1) % len(self._endpoints)
            self._conn = None if self._closed else _Conn(self._endpoints[self._index],
                                                         self._security)
            # Closing cancels the calls still on it; they see their channel replaced and retry.
            await failed.close()
        if len(self._endpoints) > 1:
            log.info("etcd endpoint %s failed; now using %s", failed.endpoint, self.endpoint)
        else:  # while etcd is away this comes at every retry: a line per retry hides the rest
            log.debug("etcd endpoint %s failed; a fresh channel to it", failed.endpoint)

    async def _call(self, what: str, op: Callable[[_Conn], Awaitable[T]]) -> T:
        """Run ``op`` on the current endpoint, failing over while endpoints do not answer."""
        errors: list[str] = []
        attempts = len(self._endpoints) + (1 if self._current().answered else 0)
        renewed = False
        while attempts > 0:
            conn = self._current()
            try:
                if conn.needs_token:
                    await conn.authenticate(self._timeout)
                result = await op(conn)
            except grpc.aio.AioRpcError as err:
                replaced = conn is not self._conn
                if (not renewed and conn.token is not None and not replaced
                        and err.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                           grpc.StatusCode.INVALID_ARGUMENT)
                        and any(m in (err.details() or "") for m in _TOKEN_EXPIRED)):
                    # The token expired (etcd's --auth-token-ttl): get a new one, once.
                    conn.token = None
                    renewed = True
                    continue
                if err.code() not in _UNREACHABLE and not replaced:
                    raise StoreError(f"{what}: {err.code().name}: {err.details()}") from err
                why = f"{conn.endpoint}: {err.code().name} {err.details()}"
            except (TimeoutError, _Retry) as err:
                replaced = conn is not self._conn
                why = f"{conn.endpoint}: {err or 'timed out'}"
            except asyncio.CancelledError:
                # grpc reports a call cut short by closing its channel (our own failover)
                # as a cancellation; only a cancellation of this task must propagate.
                task = asyncio.current_task()
                if conn is self._conn or (task is not None and task.cancelling()):
                    raise
                replaced = True
                why = f"{conn.endpoint}: channel replaced"
            else:
                conn.answered = True
                self._set_connected(True)
                return result
            if self._closed:
                raise StoreClosed("the etcd store is closed")
            errors.append(why)
            if not replaced:  # a call cut short by someone else's failover gets a free retry
                attempts -= 1
            await self._failover(conn)
        message = f"{what}: no etcd endpoint answered ({'; '.join(errors)})"
        self._set_connected(False, message)
        raise StoreUnavailable(message)

    # -- leases ----------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""
        req = rpc.LeaseGrantRequest(TTL=ttl, ID=0)

        async def op(conn: _Conn) -> Any:
            return await conn.lease.LeaseGrant(req, timeout=self._timeout)

        resp = await self._call("grant lease", op)
        if resp.error:
            raise StoreError(f"grant lease: {resp.error}")
        return int(resp.ID)

    async def keep_alive(self, lease_id: int) -> int:
        """Refresh the lease once; returns the remaining TTL; raises LeaseLost if it is gone."""
        req = rpc.LeaseKeepAliveRequest(ID=lease_id)

        async def op(conn: _Conn) -> Any:
            # One request, one answer: the owner paces refreshes. Half-closing makes etcd
            # end the stream by itself once it has answered.
            stream = _Stream(conn.lease.LeaseKeepAlive, timeout=self._timeout)
            try:
                async with asyncio.timeout(self._timeout):
                    await stream.open(req, self._timeout)
                    await stream.call.done_writing()
                    resp = await stream.call.read()
            finally:
                await stream.end()
            if resp is grpc.aio.EOF:
                raise _Retry("keep-alive stream ended without an answer")
            return resp

        resp = await self._call("keep alive", op)
        if resp.TTL <= 0:
            raise LeaseLost(f"lease {lease_id:x} expired or was revoked")
        return int(resp.TTL)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke the lease, deleting its keys now; a lease already gone is fine."""
        req = rpc.LeaseRevokeRequest(ID=lease_id)

        async def op(conn: _Conn) -> None:
            try:
                await conn.lease.LeaseRevoke(req, timeout=self._timeout)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call("revoke lease", op)

    # -- keys ------------------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write ``key``; returns the revision of the write."""
        req = rpc.PutRequest(key=key.encode(), value=value, lease=lease or 0)

        async def op(conn: _Conn) -> Any:
            return await conn.kv.Put(req, timeout=self._timeout)

        return int((await self._call(f"put {key}", op)).header.revision)

    async def put_many(self, items: list[tuple[str, bytes]], *, lease: int | None = None) -> int:
        """Write all ``items`` in one transaction (one revision); returns that revision.

        etcd caps a transaction at 128 operations by default (``--max-txn-ops``).
        """
        req = rpc.TxnRequest(success=[
            rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=v, lease=lease or 0))
            for k, v in items
        ])

        async def op(conn: _Conn) -> Any:
            return await conn.kv.Txn(req, timeout=self._timeout)

        return int((await self._call(f"put {len(items)} keys", op)).header.revision)

    async def delete(self, key: str) -> bool:
        """Delete ``key``; returns whether it existed."""
        req = rpc.DeleteRangeRequest(key=key.encode())

        async def op(conn: _Conn) -> Any:
            return await conn.kv.DeleteRange(req, timeout=self._timeout)

        return int((await self._call(f"delete {key}", op)).deleted) > 0

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many there were."""
        raw = prefix.encode()
        req = rpc.DeleteRangeRequest(key=raw or b"\0", range_end=_range_end(raw))

        async def op(conn: _Conn) -> Any:
            return await conn.kv.DeleteRange(req, timeout=self._timeout)

        return int((await self._call(f"delete prefix {prefix}", op)).deleted)

    async def get(self, key: str) -> bytes | None:
        """The value of ``key``, or None."""
        req = rpc.RangeRequest(key=key.encode())

        async def op(conn: _Conn) -> Any:
            return await conn.kv.Range(req, timeout=self._timeout)

        resp = await self._call(f"get {key}", op)
        return bytes(resp.kvs[0].value) if resp.kvs else None

    async def _range(self, prefix: str) -> Any:
        raw = prefix.encode()
        req = rpc.RangeRequest(
            key=raw or b"\0", range_end=_range_end(raw),
            sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.KEY,
        )

        async def op(conn: _Conn) -> Any:
            return await conn.kv.Range(req, timeout=self._timeout)

        return await self._call(f"get prefix {prefix}", op)

    async def get_prefix(self, prefix: str) -> Snapshot:
        """Every key under ``prefix``, sorted by key, at the revision of the read."""
        return _snapshot(await self._range(prefix))

    async def get_last(self, prefix: str, count: int) -> Snapshot:
        """The last ``count`` keys under ``prefix`` (by key), sorted by key: the newest
        entries of a time-keyed log such as the audit trail, without reading all of it."""
        raw = prefix.encode()
        req = rpc.RangeRequest(
            key=raw or b"\0", range_end=_range_end(raw), limit=count,
            sort_order=rpc.RangeRequest.DESCEND, sort_target=rpc.RangeRequest.KEY,
        )

        async def op(conn: _Conn) -> Any:
            return await conn.kv.Range(req, timeout=self._timeout)

        snap = _snapshot(await self._call(f"get last {count} of {prefix}", op))
        return Snapshot(snap.revision, snap.items[::-1])

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (operators and tests; etcd auto-compacts too)."""
        req = rpc.CompactionRequest(revision=revision, physical=True)

        async def op(conn: _Conn) -> None:
            await conn.kv.Compact(req, timeout=self._timeout)

        await self._call(f"compact {revision}", op)

    # -- users and roles (aivmmctl etcd-roles; docs/security.md) ---------------------------

    async def _auth_call(self, what: str, method: str, req: Any,
                         exists_ok: bool = False) -> Any:
        async def op(conn: _Conn) -> Any:
            try:
                return await getattr(conn.auth, method)(req, timeout=self._timeout)
            except grpc.aio.AioRpcError as err:
                if exists_ok and err.code() == grpc.StatusCode.FAILED_PRECONDITION \
                        and "already exists" in (err.details() or ""):
                    return None
                raise

        return await self._call(what, op)

    async def ensure_role(self, name: str, grants: Sequence[Permission]) -> None:
        """Create role ``name`` if absent and make its permissions exactly ``grants``."""
        await self._auth_call(f"add role {name}", "RoleAdd",
                              rpc.AuthRoleAddRequest(name=name), exists_ok=True)
        current = await self._auth_call(f"get role {name}", "RoleGet",
                                        rpc.AuthRoleGetRequest(role=name))
        for perm in current.perm:
            await self._auth_call(f"revoke from role {name}", "RoleRevokePermission",
                                  rpc.AuthRoleRevokePermissionRequest(
                                      role=name, key=perm.key, range_end=perm.range_end))
        for g in grants:
            raw = g.key.encode()
            perm = rpc.Permission(permType=_PERM_TYPES[g.kind], key=raw,
                                  range_end=_range_end(raw) if g.prefix else b"")
            await self._auth_call(f"grant to role {name}", "RoleGrantPermission",
                                  rpc.AuthRoleGrantPermissionRequest(name=name, perm=perm))

    async def ensure_user(self, name: str, password: str | None, roles: Sequence[str]) -> None:
        """Create user ``name`` (or set its password) and grant it ``roles``. A user
        without a password can only log in with a client certificate whose CN is its name."""
        added = await self._auth_call(
            f"add user {name}", "UserAdd",
            rpc.AuthUserAddRequest(name=name, password=password or "",
                                   options=rpc.UserAddOptions(no_password=password is None)),
            exists_ok=True)
        if added is None and password is not None:
            await self._auth_call(f"set password of {name}", "UserChangePassword",
                                  rpc.AuthUserChangePasswordRequest(name=name,
                                                                    password=password))
        for role in roles:
            await self._auth_call(f"grant {role} to {name}", "UserGrantRole",
                                  rpc.AuthUserGrantRoleRequest(user=name, role=role))

    async def enable_auth(self) -> None:
        """Turn etcd's authentication on (a ``root`` user with the root role must exist);
        already on is fine."""
        await self._auth_call("enable auth", "AuthEnable", rpc.AuthEnableRequest())

    async def get_item(self, key: str) -> KeyValue | None:
        """``key`` with its revisions (for a compare-and-swap), or None."""
        req = rpc.RangeRequest(key=key.encode())

        async def op(conn: _Conn) -> Any:
            return await conn.kv.Range(req, timeout=self._timeout)

        resp = await self._call(f"get {key}", op)
        if not resp.kvs:
            return None
        kv = resp.kvs[0]
        return KeyValue(_key(kv.key), bytes(kv.value), int(kv.mod_revision),
                        int(kv.create_revision))

    async def txn(self, when: Sequence[Compare], *, puts: Sequence[tuple[str, bytes]] = (),
                  deletes: Sequence[str] = (), lease: int | None = None) -> TxnResult:
        """Apply ``puts`` and ``deletes`` in one revision if every compare in ``when`` holds.

        The writes of a fenced writer (the placer) and compare-and-swap updates (aivmmctl
        scale) go through here; nothing is written when a compare fails. A retried txn
        whose first attempt was applied but unanswered fails its compare the second time:
        callers re-read and decide again, which is what a lost race needs anyway.
        """
        compares = [c.request() for c in when]
        ops = [rpc.RequestOp(request_put=rpc.PutRequest(key=k.encode(), value=v,
                                                        lease=lease or 0)) for k, v in puts]
        ops += [rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=k.encode()))
                for k in deletes]
        req = rpc.TxnRequest(compare=compares, success=ops)

        async def op(conn: _Conn) -> Any:
            return await conn.kv.Txn(req, timeout=self._timeout)

        resp = await self._call(f"txn of {len(ops)} ops", op)
        return TxnResult(bool(resp.succeeded), int(resp.header.revision))

    # -- watches ---------------------------------------------------------------------------

    async def _watch(self, prefix: str, start_revision: int) -> AsyncGenerator[_WatchBatch, None]:
        """One watch stream, response by response; the stream is cancelled on exit."""
        raw = prefix.encode()
        create = rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=raw or b"\0", range_end=_range_end(raw), start_revision=start_revision,
            progress_notify=True,
        ))

        async def op(conn: _Conn) -> tuple[_Conn, _Stream, Any]:
            # No deadline on the stream: it lives as long as its reader. Only its creation
            # has one.
            stream = _Stream(conn.watch.Watch)
            try:
                async with asyncio.timeout(self._timeout):
                    await stream.open(create, self._timeout)
                    first = await stream.call.read()
                if first is grpc.aio.EOF:
                    raise _Retry("watch stream ended before it was created")
                if (first.canceled and conn.token is not None
                        and any(m in first.cancel_reason for m in _TOKEN_EXPIRED)):
                    # etcd refuses a watch with an expired token in the stream's first
                    # answer, not as an RPC error: log in again on the next attempt, or the
                    # watch is refused for ever while nothing else renews the token.
                    conn.token = None
                    raise _Retry(f"watch refused: {first.cancel_reason}")
            except BaseException:
                await stream.end()
                raise
            return conn, stream, first

        conn, stream, resp = await self._call(f"watch {prefix}", op)
        try:
            while True:
                if resp.compact_revision:
                    raise Compacted(int(resp.compact_revision))
                if resp.canceled:
                    # etcd only cancels for a reason it states; retrying is all we can do.
                    raise StoreUnavailable(f"watch {prefix} cancelled: {resp.cancel_reason}")
                yield _WatchBatch(
                    events=[_event(e) for e in resp.events], created=resp.created,
                    revision=int(resp.header.revision), cluster_id=int(resp.header.cluster_id),
                )
                try:
                    resp = await stream.call.read()
                except grpc.aio.AioRpcError as err:
                    resp = err
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise
                    resp = None  # its channel was closed under it: failover or close()
                if not isinstance(resp, rpc.WatchResponse):
                    why = (f"{resp.code().name} {resp.details()}"
                           if isinstance(resp, grpc.aio.AioRpcError) else "stream ended")
                    message = f"watch {prefix} on {conn.endpoint} broke: {why}"
                    self._set_connected(False, message)
                    if self._closed:
                        raise StoreClosed("the etcd store is closed")
                    await self._failover(conn)
                    raise StoreUnavailable(message)
        finally:
            await stream.end()

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncGenerator[Event, None]:
        """Raw watch from ``start_revision`` (inclusive); raises on a broken stream.

        Raises :class:`StoreUnavailable` when the stream breaks and :class:`Compacted` when
        ``start_revision`` is no longer in etcd's history. The etcd watch is cancelled when
        the consumer stops: close the iterator (``contextlib.aclosing``) or cancel its task.
        """
        async with contextlib.aclosing(self._watch(prefix, start_revision)) as batches:
            async for batch in batches:
                for event in batch.events:
                    yield event

    async def sync_prefix(self, prefix: str) -> AsyncIterator[Reset | Event]:
        """A view that never ends: ``Reset`` first, then events; survives etcd restarts.

        The first item is a ``Reset`` holding a snapshot of the prefix; events follow from
        the revision after it. When the watch breaks, the view retries with jittered
        backoff (``retry_initial`` doubling up to ``retry_max``), failing over between
        endpoints, and resumes after the last revision it delivered: no event is lost or
        repeated. When that revision was compacted meanwhile, or etcd came back with another
        history (other cluster, revision gone backwards), it yields a fresh ``Reset`` and the
        consumer replaces its whole view. While etcd is away, :attr:`connected` is ``False``.
        Ends only by closing the iterator, cancelling its task, or :meth:`close` (which
        raises :class:`StoreClosed`); other store errors propagate.
        """
        # Jittered so that every scheduler and agent watching a restarted etcd do not all
        # come back at the same instant.
        retry = Backoff(initial=self._retry_initial, cap=self._retry_max, jitter=0.5)
        need_reset = True
        last = 0  # every change up to this revision has been delivered
        cluster_id = 0
        while True:
            try:
                if need_reset:
                    resp = await self._range(prefix)
                    snapshot = _snapshot(resp)
                    last, cluster_id = snapshot.revision, int(resp.header.cluster_id)
                    need_reset = False
                    retry.reset()
                    yield Reset(snapshot)
                async with contextlib.aclosing(self._watch(prefix, last + 1)) as batches:
                    async for batch in batches:
                        if batch.created:
                            retry.reset()
                            if batch.cluster_id != cluster_id or batch.revision < last:
                                log.warning("etcd came back with another history; resyncing",
                                            extra={"prefix": prefix})
                                need_reset = True
                                break
                        # Only whole responses move ``last``: a revision's events arrive
                        # together, and a stream breaks between responses, never inside one.
                        for event in batch.events:
                            if event.revision > last:
                                yield event
                        if batch.events:
                            last = max(last, batch.events[-1].revision)
                        elif not batch.created:
                            last = max(last, batch.revision)  # progress mark
            except Compacted as err:
                log.warning("watch start compacted (history from %d); resyncing", err.revision,
                            extra={"prefix": prefix})
                need_reset = True
            except StoreUnavailable as err:
                pause = retry.next()
                log.info("etcd watch down, retrying in %.2fs: %s", pause, err)
                await asyncio.sleep(pause)


def _snapshot(resp: Any) -> Snapshot:
    return Snapshot(
        revision=int(resp.header.revision),
        items=[KeyValue(_key(kv.key), bytes(kv.value), int(kv.mod_revision),
                        int(kv.create_revision)) for kv in resp.kvs],
    )


def _event(e: Any) -> Event:
    kind: Literal["put", "delete"] = "delete" if e.type == rpc.Event.DELETE else "put"
    return Event(kind=kind, key=_key(e.kv.key), value=bytes(e.kv.value) if kind == "put" else b"",
                 revision=int(e.kv.mod_revision))
