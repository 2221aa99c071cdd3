"""Routes as operators see them: the split, and each target's figures summed over the
scheduler replicas that published them; and the cost per million output tokens of each
backend (docs/routes.md). Shared by ``aivmmctl routes``/``status`` and the status page, so
they agree; everything but :func:`read_routes` is pure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from common.keys import Keys
from common.records import (
    BackendRecord,
    NodeRecord,
    RouteRecord,
    RouteStats,
    parse_each,
    parse_route,
    parse_route_stats,
    to_dict,
)


class PrefixReader(Protocol):
    async def get_prefix(self, prefix: str) -> Any: ...


@dataclass(slots=True)
class RouteRecords:
    routes: list[RouteRecord]
    stats: list[RouteStats]
    skipped: int


def parse_routes(routes: Iterable[bytes], stats: Iterable[bytes]) -> RouteRecords:
    parsed, bad_routes = parse_each(routes, parse_route)
    figures, bad_stats = parse_each(stats, parse_route_stats)
    out = RouteRecords(parsed, figures, bad_routes + bad_stats)
    out.routes.sort(key=lambda r: r.name)
    return out


async def read_routes(store: PrefixReader, keys: Keys) -> RouteRecords:
    """Every route and every scheduler replica's published figures."""
    routes = await store.get_prefix(keys.routes)
    stats = await store.get_prefix(keys.route_stats)
    return parse_routes((kv.value for kv in routes.items), (kv.value for kv in stats.items))


def _rate(num: float, den: float) -> float | None:
    return None if den <= 0 else num / den


def route_views(routes: Sequence[RouteRecord], stats: Sequence[RouteStats]
                ) -> list[dict[str, Any]]:
    """One dict per route: its split and, per target, the figures of every replica summed
    (the p95 is the highest of the replicas' own, which cannot be summed)."""
    sums: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {
        "requests": 0, "errors": 0, "fallbacks": 0, "ttft_sum_s": 0.0, "ttft_count": 0,
        "p95_ttft_ms": None, "output_tokens": 0, "generation_s": 0.0})
    for s in stats:
        for f in s.targets:
            acc = sums[(f.route, f.target)]
            for k in ("requests", "errors", "fallbacks", "ttft_sum_s", "ttft_count",
                      "output_tokens", "generation_s"):
                acc[k] += getattr(f, k)
            if f.p95_ttft_ms is not None:
                acc["p95_ttft_ms"] = max(acc["p95_ttft_ms"] or 0.0, f.p95_ttft_ms)
    views = []
    for r in routes:
        tripped = {t.target: t for t in r.tripped}
        rows: list[tuple[str, int | None]] = [(t.target, t.weight) for t in r.targets]
        rows += [(f, None) for f in r.fallback if f not in {t.target for t in r.targets}]
        live = sum(w or 0 for name, w in rows if name not in tripped)
        served = sum(sums[(r.name, name)]["requests"] for name, _ in rows)
        targets = []
        for name, weight in rows:
            acc = sums[(r.name, name)]
            effective = 0 if weight is None or name in tripped else weight
            tokens_per_s = _rate(acc["output_tokens"], acc["generation_s"])
            ttft = _rate(acc["ttft_sum_s"], acc["ttft_count"])
            trip = tripped.get(name)
            targets.append({
                "target": name, "weight": weight, "effective_weight": effective,
                "fallback_rank": r.fallback.index(name) + 1 if name in r.fallback else None,
                "split_pct": round(100 * effective / live, 2) if live else 0.0,
                "requests": acc["requests"],
                "served_pct": round(100 * acc["requests"] / served, 2) if served else None,
                "errors": acc["errors"],
                "error_rate": None if not acc["requests"] else
                round(acc["errors"] / acc["requests"], 4),
                "fallbacks": acc["fallbacks"],
                "ttft_ms": None if ttft is None else round(ttft * 1000, 1),
                "p95_ttft_ms": acc["p95_ttft_ms"],
                "output_tokens": acc["output_tokens"],
                "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 1),
                "tripped": None if trip is None else to_dict(trip)})
        views.append({"name": r.name, "targets": targets, "fallback": list(r.fallback),
                      "guard": None if r.guard is None else to_dict(r.guard),
                      "requests": served, "replicas": len(stats),
                      "created_at": r.created_at, "updated_at": r.updated_at})
    return views


def cost_shares(nodes: Sequence[NodeRecord], backends: Sequence[BackendRecord]
                ) -> dict[str, float]:
    """Per backend (``node/name``), its part of its node's ``cost_per_hour``: split over the
    node's backends by the GPUs each holds (a backend without GPUs counts as one)."""
    cost = {n.node: n.cost_per_hour for n in nodes if n.cost_per_hour is not None}
    weights: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for b in backends:
        if b.node in cost and b.state != "stopped":
            weights[b.node].append((f"{b.node}/{b.name}", max(1, len(b.gpus))))
    out = {}
    for node, parts in weights.items():
        total = sum(w for _, w in parts)
        for key, w in parts:
            out[key] = cost[node] * w / total
    return out


def backend_costs(nodes: Sequence[NodeRecord], backends: Sequence[BackendRecord],
                  stats: Sequence[RouteStats]) -> list[dict[str, Any]]:
    """Per backend: its hourly cost share, the output tokens the schedulers served from it
    (summed), the fleet's token rate (each replica's tokens over its own watching time,
    summed) and the cost per million output tokens that gives."""
    shares = cost_shares(nodes, backends)
    tokens: dict[str, int] = defaultdict(int)
    rate: dict[str, float] = defaultdict(float)
    for s in stats:
        for f in s.backends:
            tokens[f.backend] += f.output_tokens
            if f.seconds > 0:
                rate[f.backend] += f.output_tokens / f.seconds
    out = []
    for b in backends:
        key = f"{b.node}/{b.name}"
        share = shares.get(key)
        r = rate.get(key, 0.0)
        out.append({
            "backend": key, "node": b.node, "models": list(b.models),
            "cost_per_hour": None if share is None else round(share, 4),
            "output_tokens": tokens.get(key, 0),
            "tokens_per_s": round(r, 2) if r else None,
            "cost_per_mtok": None if share is None or not r else
            round(share / 3600 / r * 1_000_000, 4)})
    return out
