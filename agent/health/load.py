"""An engine's load from its Prometheus ``/metrics`` text: running, queued, KV-cache usage.

:func:`parse_load` is pure and never raises: it knows the names vLLM (current and older),
SGLang, llama.cpp's server and OpenVINO Model Server use (docs/engines.md, "Load metrics",
says which engine gives which and where the names come from). Whatever an engine sends,
a reading it cannot trust (NaN, an infinity, a negative or absurd count, a ratio outside
0..1, a malformed sample) is ``None`` for that reading; the others stand.
"""

from __future__ import annotations

import math
import re

from common.records import BackendLoad

# Candidate series per reading, most specific first: the first one present in the body
# decides that reading (vLLM >= 0.10 sends both KV names for a while; the new one wins).
RUNNING = (
    "vllm:num_requests_running",
    "sglang:num_running_reqs",
    "llamacpp:requests_processing",
    "ovms_current_graphs",  # OVMS: LLM servables are MediaPipe graphs, one per request
    "ovms_current_requests",  # OVMS: a plain model's requests in process
)
WAITING = (
    "vllm:num_requests_waiting",
    "sglang:num_queue_reqs",
    "llamacpp:requests_deferred",
)
# All documented as a ratio, "1 means 100 percent" (none of these engines sends percent).
KV_RATIO = (
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
    "llamacpp:kv_cache_usage_ratio",
)
_COUNTS = frozenset(RUNNING + WAITING)
_WANTED = _COUNTS | frozenset(KV_RATIO)
_PREFIXES = ("vllm:", "sglang:", "llamacpp:", "ovms_")  # every name above starts so

# More requests than this on one engine is not a reading, it is a broken exporter.
MAX_COUNT = 1_000_000
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
# A finite decimal number; NaN, +Inf, -Inf, hex and anything else are not a usable value.
_FINITE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_TIMESTAMP = re.compile(r"-?\d+")
_MAX_TOKEN = 64  # characters in a value or timestamp; longer is garbage


def parse_load(text: str | bytes) -> BackendLoad | None:
    """The load readings in Prometheus text ``text``; None when it has no usable reading.

    Counts of several label sets (one per model) are summed; the KV-cache ratio is the max.
    A series with any sample that is not a trustworthy value makes its reading None.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        values, bad = _collect(text)
        running = _count(RUNNING, values, bad)
        waiting = _count(WAITING, values, bad)
        kv = _ratio(KV_RATIO, values, bad)
    except Exception:  # a parser bug must cost the readings, not the agent
        return None
    if running is None and waiting is None and kv is None:
        return None
    return BackendLoad(running=running, waiting=waiting, kv_cache_usage=kv)


def _collect(text: str) -> tuple[dict[str, list[float]], set[str]]:
    """The samples of the wanted series, and the series with an untrustworthy sample."""
    values: dict[str, list[float]] = {}
    bad: set[str] = set()
    for raw in text.splitlines():
        line = raw.lstrip()
        if not line.startswith(_PREFIXES):  # comments, HELP, TYPE and other series
            continue
        m = _NAME.match(line)
        if m is None or m.group() not in _WANTED:
            continue
        name = m.group()
        value = _sample_value(line[m.end():])
        if value is None:
            bad.add(name)
        else:
            values.setdefault(name, []).append(value)
    return values, bad


def _sample_value(rest: str) -> float | None:
    """The finite value after a series name: ``{labels} value [timestamp]``; else None."""
    if rest.startswith("{"):
        end = _labels_end(rest)
        if end is None:
            return None
        rest = rest[end:]
    elif rest and not rest[0].isspace():  # the name ran on into something else
        return None
    tokens = rest.split()
    if not 1 <= len(tokens) <= 2 or any(len(t) > _MAX_TOKEN for t in tokens):
        return None
    if len(tokens) == 2 and not _TIMESTAMP.fullmatch(tokens[1]):
        return None
    if not _FINITE.fullmatch(tokens[0]):
        return None
    value = float(tokens[0])
    return value if math.isfinite(value) else None  # "1e999" overflows to inf


def _labels_end(rest: str) -> int | None:
    """The index just past the ``}`` closing the label set that ``rest`` opens; None if open.

    Label values are quoted and may hold spaces, braces and ``\\"``-escaped quotes.
    """
    quoted = False
    escaped = False
    for i, ch in enumerate(rest):
        if quoted:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "}":
            return i + 1
    return None


def _present(names: tuple[str, ...], values: dict[str, list[float]],
             bad: set[str]) -> str | None:
    return next((n for n in names if n in values or n in bad), None)


def _count(names: tuple[str, ...], values: dict[str, list[float]],
           bad: set[str]) -> int | None:
    name = _present(names, values, bad)
    if name is None or name in bad:
        return None
    samples = values[name]
    if any(v < 0 or v > MAX_COUNT or v != int(v) for v in samples):
        return None
    total = sum(samples)
    return int(total) if total <= MAX_COUNT else None


def _ratio(names: tuple[str, ...], values: dict[str, list[float]],
           bad: set[str]) -> float | None:
    name = _present(names, values, bad)
    if name is None or name in bad:
        return None
    samples = values[name]
    if any(not 0.0 <= v <= 1.0 for v in samples):
        return None
    return max(samples)
