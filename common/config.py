"""Typed configuration: TOML file, ``AIVMM_*`` environment, command-line flags.

A config class is a plain dataclass. Its type hints are the schema: the loader converts and
checks every value against them, so a daemon never sees a wrong type. Precedence is
flag > environment > file > default. Every failure is a :class:`ConfigError` that names the
source (file path, environment variable or flag), the key and what was expected; the daemons
print it as one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import orjson

from common.endpoints import etcd_target, is_tls
from common.store import EtcdSecurity
from common.typedesc import describe

T = TypeVar("T")
ENV_PREFIX = "AIVMM_"
_MISSING = object()


class ConfigError(Exception):
    """A configuration value that cannot be used; ``str()`` is the one line to print."""

    def __init__(self, source: str, key: str, expected: str, got: Any = _MISSING) -> None:
        self.source = source
        self.key = key
        self.expected = expected
        self.got = got
        super().__init__(str(self))

    def __str__(self) -> str:
        line = f"{self.source}: key '{self.key}': expected {self.expected}"
        if self.got is not _MISSING:
            line += f", got {_show(self.got)}"
        return line


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Check = Callable[[Any], str | None]


def setting(default: Any = _MISSING, *, check: Check | None = None, doc: str = "",
            secret: bool = False) -> Any:
    """Declare a config field; ``check(value)`` returns what was expected when it fails.

    A ``secret`` field's value is never shown in an error (keys, passwords)."""
    metadata = {"check": check, "doc": doc, "secret": secret}
    if default is _MISSING:
        return dataclasses.field(metadata=metadata)
    if isinstance(default, list | dict):
        # mypy cannot infer a lambda with a default argument where a Callable[[], T] is wanted.
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=metadata)  # type: ignore[misc]
    return dataclasses.field(default=default, metadata=metadata)


# -- small reusable checks ---------------------------------------------------------------------

def positive(value: Any) -> str | None:
    return None if value > 0 else "a number > 0"


def port_number(value: Any) -> str | None:
    return None if 0 < value < 65536 else "a port number 1..65535"


def host_port(value: Any) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "HOST:PORT"
    return None


def url_list(value: Any) -> str | None:
    if not value:
        return "at least one URL"
    for url in value:
        if not url.startswith(("http://", "https://")):
            return "URLs like http://HOST:PORT or https://HOST:PORT (port 1..65535)"
        try:
            etcd_target(url)
        except ValueError:
            return "URLs like http://HOST:PORT or https://HOST:PORT (port 1..65535)"
    if len({is_tls(url) for url in value}) > 1:
        return "URLs all http:// or all https://, not mixed"
    return None


LOG_LEVELS = ("debug", "info", "warning", "error")


def log_level(value: Any) -> str | None:
    return None if value.lower() in LOG_LEVELS else "one of debug, info, warning, error"


# -- conversion --------------------------------------------------------------------------------

def _from_string(tp: Any, raw: str) -> Any:
    """Turn an environment or flag string into the shape a TOML file would have given."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw == "" and type(None) in typing.get_args(tp):
            return None
        for arg in args:
            try:
                value = _from_string(arg, raw)
                _convert(arg, value, "", "")
                return value
            except (ConfigError, ValueError):
                continue
        return raw
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        return raw
    if tp is int:
        try:
            return int(raw)
        except ValueError:
            return raw
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            return raw
    if origin is list or origin is dict or dataclasses.is_dataclass(tp):
        text = raw.strip()
        if text.startswith(("[", "{")):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                return raw
        if origin is list:
            (inner,) = typing.get_args(tp)
            return [_from_string(inner, part.strip()) for part in text.split(",") if part.strip()]
        return raw
    return raw


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = ConfigError(source, key, describe(tp), value)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, key)
            except ConfigError as err:
                # A list of the right shape with one wrong item explains more than "or ...".
                if typing.get_origin(arg) is list and isinstance(value, list):
                    raise err from None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (inner,) = args
        return [_convert(inner, item, source, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        out = {}
        for k, v in value.items():
            if not isinstance(v, str | int | float) or isinstance(v, bool):
                raise ConfigError(source, f"{key}.{k}", "a string", v)
            out[str(k)] = str(v)
        return out
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, key, "a table", value)
        return build(typing.cast("type[Any]", tp), value, source, prefix=f"{key}.")
    raise TypeError(f"unsupported config type {tp!r}")  # a bug in a config class, not input


def build(cls: type[T], values: Mapping[str, Any], source: str, prefix: str = "") -> T:
    """Build ``cls`` from already parsed values (a TOML table), checking every field."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for name in values:
        if name not in fields:
            raise ConfigError(source, f"{prefix}{name}", "a known key (unknown key)")
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if name not in values:
            no_factory = field.default_factory is dataclasses.MISSING
            if field.default is dataclasses.MISSING and no_factory:
                raise ConfigError(source, key, f"{describe(hints[name])} (missing)")
            continue
        secret = field.metadata.get("secret", False)
        try:
            value = _convert(hints[name], values[name], source, key)
        except ConfigError as err:
            if secret:  # the value may be key material: name the key, never show it
                raise ConfigError(err.source, err.key, err.expected) from None
            raise
        check = field.metadata.get("check")
        if check is not None and value is not None:
            problem = check(value)
            if problem:
                if secret:
                    raise ConfigError(source, key, problem)
                raise ConfigError(source, key, problem, values[name])
        kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except ValueError as err:  # __post_init__ cross-field checks raise ValueError("key: expected")
        field_name, _, expected = str(err).partition(": ")
        raise ConfigError(source, f"{prefix}{field_name}", expected) from None
    return obj


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file; a syntax error becomes a ConfigError naming the line."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(str(path), "-", "an existing file (not found)") from None
    except PermissionError:
        raise ConfigError(str(path), "-", "a readable file (permission denied)") from None
    except IsADirectoryError:
        raise ConfigError(str(path), "-", "a file (is a directory)") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(str(path), "-", f"valid TOML ({err})") from None


def load(
    cls: type[T],
    path: str | os.PathLike[str],
    *,
    explicit: bool,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, str | None] | None = None,
) -> T:
    """Load ``cls`` from file, environment and flags (flag > env > file > default).

    ``explicit`` says the path was named on the command line: then a missing file is an
    error; otherwise a missing default file means defaults.
    """
    environ = os.environ if environ is None else environ
    path = Path(path)
    file_values: dict[str, Any] = {}
    if explicit or path.exists():
        file_values = read_toml(path)
    # Check the file on its own first so its errors name the file, not a merged view.
    build(cls, file_values, str(path))

    hints = typing.get_type_hints(cls)
    merged = dict(file_values)
    origin: dict[str, str] = {}
    for name in hints:
        env_key = ENV_PREFIX + name.upper()
        if env_key in environ:
            merged[name] = _from_string(hints[name], environ[env_key])
            origin[name] = f"environment {env_key}"
    for name, raw in (flags or {}).items():
        if raw is not None:
            merged[name] = _from_string(hints[name], raw)
            origin[name] = f"flag --{name.replace('_', '-')}"
    for name, where in origin.items():
        # Validate each overriding value alone so the error names where it came from.
        single = {**file_values, name: merged[name]}
        build(cls, single, where)
    return build(cls, merged, str(path))


@dataclasses.dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Keys every daemon has; each daemon's config class extends it."""

    etcd: list[str] = setting(["http://127.0.0.1:2379"], check=url_list)
    etcd_prefix: str = setting(
        "/aivmm/v1", check=lambda v: None if v.startswith("/") and not v.endswith("/")
        else "a path like /aivmm/v1 (leading /, no trailing /)")
    log_level: str = setting("info", check=log_level)
    log_format: Literal["text", "json"] = setting("text")
    # etcd security (docs/security.md): TLS for https:// endpoints (the CA of etcd's server
    # certificate, and a client certificate and key for mutual TLS), and etcd's user and
    # password. The password comes from etcd_password_file or $AIVMM_ETCD_PASSWORD, never a
    # flag or the config file itself.
    etcd_ca: str | None = setting(None)
    etcd_cert: str | None = setting(None)
    etcd_key: str | None = setting(None)
    etcd_user: str | None = setting(None, check=lambda v: None if v.strip() else "a user name")
    etcd_password_file: str | None = setting(None)

    def __post_init__(self) -> None:
        check_etcd_security(self)

    def etcd_security(self, environ: Mapping[str, str] | None = None) -> EtcdSecurity | None:
        """The credentials the store presents, read from their files now; None: none."""
        return read_etcd_security(self.etcd_ca, self.etcd_cert, self.etcd_key, self.etcd_user,
                                  self.etcd_password_file, environ)


PASSWORD_ENV = "AIVMM_ETCD_PASSWORD"


def _readable(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        return f"a readable file ({path}: {err.strerror})"
    return None


def check_etcd_security(c: Any, environ: Mapping[str, str] | None = None,
                        keys: Mapping[str, str] | None = None) -> None:
    """Cross-checks of the etcd_* keys; raises ValueError("key: expected ...").

    ``keys`` renames the keys in the message (aivmmctl names its flags)."""
    environ = os.environ if environ is None else environ
    name = {k: (keys or {}).get(k, k) for k in
            ("etcd", "etcd_ca", "etcd_cert", "etcd_key", "etcd_user", "etcd_password_file")}
    tls = any(is_tls(u) for u in c.etcd)
    for key in ("etcd_ca", "etcd_cert", "etcd_key"):
        path = getattr(c, key)
        if path is None:
            continue
        if not tls:
            raise ValueError(f"{name[key]}: https:// etcd endpoints (a certificate is of no "
                             "use over plain http)")
        problem = _readable(path)
        if problem:
            raise ValueError(f"{name[key]}: {problem}")
    if (c.etcd_cert is None) != (c.etcd_key is None):
        missing = "etcd_key" if c.etcd_key is None else "etcd_cert"
        raise ValueError(f"{name[missing]}: a file (etcd_cert and etcd_key go together)")
    if c.etcd_ca is not None:
        try:
            ssl.create_default_context(cafile=c.etcd_ca)
        except (ssl.SSLError, ValueError):
            raise ValueError(f"{name['etcd_ca']}: a PEM CA certificate "
                             f"({c.etcd_ca} is not one)") from None
    if c.etcd_cert is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(c.etcd_cert, c.etcd_key)
        except (ssl.SSLError, ValueError):
            raise ValueError(f"{name['etcd_key']}: the private key of {name['etcd_cert']} "
                             f"(a PEM certificate and its key; {c.etcd_cert} and "
                             f"{c.etcd_key} do not match or are not PEM)") from None
    if c.etcd_password_file is not None:
        if c.etcd_user is None:
            raise ValueError(f"{name['etcd_user']}: a user name (a password file was given)")
        problem = _readable(c.etcd_password_file)
        if problem:
            raise ValueError(f"{name['etcd_password_file']}: {problem}")
        with open(c.etcd_password_file, encoding="utf-8", errors="replace") as fh:
            if not fh.read().strip():
                raise ValueError(f"{name['etcd_password_file']}: a file holding the password "
                                 "(it is empty)")


def read_etcd_security(ca: str | None, cert: str | None, key: str | None, user: str | None,
                       password_file: str | None,
                       environ: Mapping[str, str] | None = None) -> EtcdSecurity | None:
    """Read the files named (already checked) into an EtcdSecurity; None when none is set."""
    environ = os.environ if environ is None else environ

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as fh:
            return fh.read()

    password: str | None = None
    if user is not None:
        if password_file is not None:
            with open(password_file, encoding="utf-8") as fh:
                password = fh.read().strip()
        else:
            password = environ.get(PASSWORD_ENV) or None
        if password is None and cert is None:
            raise ConfigError("environment", "etcd_password_file",
                              f"a file with {user}'s password (or ${PASSWORD_ENV}; with a "
                              "client certificate and no password, etcd takes its CN as the "
                              "user)")
        if password is None:
            user = None  # a client certificate's CN is the user
    if not any((ca, cert, key, user)):
        return None
    return EtcdSecurity(ca=read(ca), cert=read(cert), key=read(key), user=user,
                        password=password)
