"""The status page (``GET /``) and its data (``GET /v1/cluster``).

The page is a fixed HTML document with inline CSS and JS and no data of its own, so it is
served without a key; it polls ``/v1/cluster`` every 2 s. The JSON combines etcd's view
(nodes and their GPUs, backend records, and deployments with their placement and replicas
as common/deployview.py builds them for aivmmctl too; read on demand and cached for a few
seconds, so a page left open costs etcd one round of reads per cache period) with this
replica's own figures: its latency estimates, in-flight counts, ejections, request rates
and recent failovers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from common.audit import parse_entries
from common.deployview import deployment_views, read_records
from common.keys import Keys
from common.records import BackendRecord, RecordError, parse_backend, parse_node, to_dict
from common.routeview import backend_costs, read_routes, route_views
from scheduler import score
from scheduler.routing import Router

log = logging.getLogger(__name__)

ETCD_CACHE_S = 3.0
RATE_WINDOW_S = 30.0
ETCD_READ_S = 2.0  # a status read never waits on etcd longer than this
AUDIT_SHOWN = 20  # audit entries on the page ("Last changes")


@dataclass(frozen=True, slots=True)
class Failover:
    at: float  # Unix seconds
    model: str
    backend: str
    reason: str


class FailoverLog:
    """The last few failovers of this replica, newest last (a bounded ring)."""

    def __init__(self, size: int = 50) -> None:
        self.items: collections.deque[Failover] = collections.deque(maxlen=size)

    def add(self, model: str, backend: str, reason: str) -> None:
        self.items.append(Failover(time.time(), model, backend, reason))


class RequestRates:
    """Requests per second from snapshots of the request counter, taken when asked.

    ``totals`` gives the counter's current values by (model, backend); the rate is the
    difference to the oldest snapshot within the window (or the newest one before it, when
    nobody looked for a while), so no per-request work is added.
    """

    def __init__(self, totals: Callable[[], dict[tuple[str, str], float]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._totals = totals
        self._clock = clock
        self._snaps: collections.deque[tuple[float, dict[tuple[str, str], float]]] = \
            collections.deque(maxlen=64)
        # The counters start at zero with the app, so requests served before anyone
        # looked still count.
        self._snaps.append((clock(), {}))

    def rates(self) -> dict[tuple[str, str], float] | None:
        """Per (model, backend) requests/s over up to RATE_WINDOW_S; None until 1 s known."""
        now = self._clock()
        current = self._totals()
        if not self._snaps or now - self._snaps[-1][0] >= 1.0:
            self._snaps.append((now, current))
        while len(self._snaps) > 1 and now - self._snaps[1][0] >= RATE_WINDOW_S:
            self._snaps.popleft()
        then, old = self._snaps[0]
        if now - then < 1.0:
            return None
        return {k: max(0.0, v - old.get(k, 0.0)) / (now - then) for k, v in current.items()}


class Store(Protocol):
    async def get_prefix(self, prefix: str) -> Any: ...

    async def get_last(self, prefix: str, count: int) -> Any: ...


@dataclass(slots=True)
class EtcdView:
    """Node, backend and deployment records read from etcd on demand, cached for
    ETCD_CACHE_S."""

    keys: Keys
    read_at: float = 0.0  # monotonic
    nodes: list[dict[str, Any]] = field(default_factory=list)
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)  # the last changes, newest first
    # Routes with every replica's figures summed, and each backend's cost (common/routeview).
    routes: list[dict[str, Any]] = field(default_factory=list)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    error: str | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self, store: Store | None) -> None:
        """Re-read etcd when the cache is older than ETCD_CACHE_S; keep the view on errors."""
        async with self._lock:
            if store is None or time.monotonic() - self.read_at < ETCD_CACHE_S:
                return
            try:
                nodes, backends, deployments, trail, routed = await asyncio.wait_for(
                    asyncio.gather(
                        store.get_prefix(self.keys.nodes), store.get_prefix(self.keys.backends),
                        read_records(store, self.keys),
                        store.get_last(self.keys.audit, AUDIT_SHOWN),
                        read_routes(store, self.keys)), ETCD_READ_S)
            except Exception as err:  # an etcd outage: keep the last view, say so
                self.error = str(err) or type(err).__name__
                self.read_at = time.monotonic()
                return
            self.error = None
            self.read_at = time.monotonic()
            self.nodes = []
            node_records = []
            for kv in nodes.items:
                try:
                    node_records.append(parse_node(kv.value))
                except RecordError:
                    continue
                self.nodes.append(to_dict(node_records[-1]))
            self.backends = {}
            records: list[BackendRecord] = []
            for kv in backends.items:
                try:
                    b = parse_backend(kv.value)
                except RecordError:
                    continue
                records.append(b)
                self.backends[f"{b.node}/{b.name}"] = to_dict(b)
            self.deployments = deployment_views(deployments, records)
            self.routes = route_views(routed.routes, routed.stats)
            self.costs = {c["backend"]: c
                          for c in backend_costs(node_records, records, routed.stats)}
            entries, _ = parse_entries((kv.key, kv.value) for kv in trail.items)
            # Who did what and why; not the old and new values, which may hold environment
            # values, and /v1/cluster may be public (aivmmctl audit shows them).
            self.audit = [{k: v for k, v in to_dict(e).items() if k not in ("old", "new")}
                          for e in reversed(entries)]


def cluster(router: Router, view: EtcdView, rates: dict[tuple[str, str], float] | None,
            failovers: FailoverLog, *, etcd_connected: bool, now: float) -> dict[str, Any]:
    """The JSON behind the status page (a pure function of the replica's state)."""
    per_backend: dict[str, float] = collections.defaultdict(float)
    per_model: dict[str, float] = collections.defaultdict(float)
    for (model, backend), r in (rates or {}).items():
        per_backend[backend] += r
        per_model[model] += r
    backends = []
    for b in sorted(router.backends.values(), key=lambda x: x.key):
        record = view.backends.get(b.key, {})
        state = record.get("state", "ready" if b.ready else "not ready")
        if b.ready and b.ejection.ejected(now):
            state = "ejected"
        backends.append({
            "key": b.key, "node": b.node, "name": b.name, "models": list(b.models),
            "url": b.url, "state": state, "engine": record.get("engine"),
            "error": record.get("error"),
            "latency_ms": round(b.latency(now) * 1000, 2),
            "probe_latency_ms": record.get("probe_latency_ms"),
            "inflight": b.inflight, "pending": b.pending, "waiting": b.waiting,
            # What the router learnt of the device: decode speed, and the floor of time to
            # first token per 2 KiB of prompt (docs/scheduler.md, "The cost").
            "tpot_ms": round(b.tpot(now) * 1000, 2) if b.tpot_samples else None,
            "ttft_floor_ms": round(b.base_rate * score.SIZE_FLOOR * 1000, 2)
            if b.samples else None,
            "cost_per_mtok": view.costs.get(b.key, {}).get("cost_per_mtok"),
            "rate": None if rates is None else round(per_backend.get(b.key, 0.0), 3)})
    return {
        "etcd": {"connected": etcd_connected, "error": view.error},
        "nodes": view.nodes,
        "backends": backends,
        # Only the models a backend in the table serves: the rates also hold models whose
        # backends have gone, and "" for requests rejected before a model was chosen.
        "models": {m: None if rates is None else round(per_model.get(m, 0.0), 3)
                   for m in sorted({m for b in backends for m in b["models"]})},
        "request_rate": None if rates is None else round(sum(per_model.values()), 3),
        "deployments": view.deployments,
        "routes": view.routes,
        "audit": view.audit,
        "failovers": [{"at": f.at, "model": f.model, "backend": f.backend, "reason": f.reason}
                      for f in reversed(failovers.items)],
        "generated_at": time.time(),
    }


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>aivmm cluster</title>
<style>
:root{--bg:#0f1419;--panel:#182029;--line:#2a3440;--fg:#e6edf3;--dim:#8b98a5;
--ok:#3fb950;--warn:#d29922;--bad:#f85149;--info:#58a6ff}
*{box-sizing:border-box}body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",
Roboto,sans-serif;background:var(--bg);color:var(--fg)}
header{display:flex;align-items:center;gap:16px;padding:14px 24px;border-bottom:1px solid
var(--line)}h1{font-size:18px;margin:0}h2{font-size:13px;text-transform:uppercase;
letter-spacing:.06em;color:var(--dim);margin:0 0 8px}
main{padding:16px 24px;display:grid;gap:16px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:12px}
.card{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:10px 14px}
.card b{display:block;font-size:24px}.card span{color:var(--dim);font-size:12px}
section{background:var(--panel);border:1px solid var(--line);border-radius:8px;padding:12px}
table{width:100%;border-collapse:collapse}th,td{text-align:left;padding:5px 8px;
border-bottom:1px solid var(--line);white-space:nowrap}th{color:var(--dim);font-weight:500;
font-size:12px}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;font-weight:600}
.ready,.connected{background:#1f3d2a;color:var(--ok)}.starting{background:#1c2f45;
color:var(--info)}.unhealthy,.ejected{background:#3d2f12;color:var(--warn)}
.stopped,.disconnected,.not-ready{background:#42191b;color:var(--bad)}
.bar{display:inline-block;width:80px;height:8px;background:var(--line);border-radius:4px;
vertical-align:middle;margin-right:6px;overflow:hidden}.bar i{display:block;height:100%;
background:var(--info)}.dim{color:var(--dim)}#updated{margin-left:auto;color:var(--dim)}
.err{color:var(--bad)}.warn{color:var(--warn)}.wrap{white-space:normal}td.wrap{min-width:240px}
.assigned,.removing{background:var(--line);color:var(--dim)}
</style></head><body>
<header><h1>aivmm</h1><span id="etcd" class="pill">…</span><span id="updated">loading…</span>
</header>
<main>
<div class="cards" id="cards"></div>
<section><h2>Nodes and GPUs</h2><table id="gpus"><thead><tr><th>node</th><th>gpu</th>
<th>name</th><th>memory</th><th>utilisation</th><th>temp</th><th>power</th></tr></thead>
<tbody></tbody></table></section>
<section><h2>Deployments</h2><table id="deployments"><thead><tr><th>deployment</th>
<th>model</th><th class="num">desired / placed / ready</th><th>replicas (node, GPUs, state)</th>
<th>pending</th></tr></thead><tbody></tbody></table></section>
<section><h2>Routes</h2><table id="routes"><thead><tr><th>route</th><th>target</th>
<th class="num">weight</th><th class="num">split</th><th class="num">requests</th>
<th class="num">served</th><th class="num">errors</th><th class="num">TTFT ms</th>
<th class="num">p95 ms</th><th class="num">tokens</th><th class="num">tok/s</th><th>guard</th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Backends</h2><table id="backends"><thead><tr><th>backend</th><th>model</th>
<th>state</th><th>engine</th><th class="num">latency ms</th><th class="num">probe ms</th>
<th class="num" title="the quickest time to first token, per 2 KiB of prompt">
TTFT floor ms</th>
<th class="num" title="learnt decode speed: time per output token">ms/token</th>
<th class="num">in flight</th><th class="num">queued</th><th class="num">req/s</th>
<th class="num">cost/Mtok</th><th>error</th></tr></thead><tbody></tbody></table></section>
<section id="keys-section" hidden><h2>API keys (last 24 h, every replica)</h2>
<table id="keys"><thead><tr><th>key</th><th>state</th><th>models</th>
<th class="num">rpm</th><th class="num">tpm</th><th class="num">parallel</th>
<th class="num">in flight</th><th class="num">requests</th><th class="num">errors</th>
<th class="num">rate limited</th><th class="num">prompt tok</th><th class="num">completion tok</th>
</tr></thead><tbody></tbody></table></section>
<section><h2>Last changes</h2><table id="audit"><thead><tr><th>when</th><th>actor</th>
<th>verb</th><th>target</th><th>detail</th></tr></thead><tbody></tbody></table></section>
<section><h2>Recent failovers</h2><table id="failovers"><thead><tr><th>when</th><th>model</th>
<th>failed backend</th><th>reason</th></tr></thead><tbody></tbody></table></section>
</main>
<script>
"use strict";
const $ = (s) => document.querySelector(s);
const esc = (v) => String(v ?? "").replace(/[&<>"']/g,
  (c) => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const num = (v, d = 0) => v == null ? "-" : Number(v).toFixed(d);
const unit = (v, u) => v == null ? "-" : Number(v).toFixed(0) + u;
const gib = (b) => b == null ? "-" : (b / 2 ** 30).toFixed(1);
const pill = (s) => `<span class="pill ${esc(String(s).replace(" ", "-"))}">${esc(s)}</span>`;
function bar(ratio) {
  if (ratio == null) return "-";
  const pct = Math.max(0, Math.min(1, ratio)) * 100;
  return `<span class="bar"><i style="width:${pct}%"></i></span>${pct.toFixed(0)}%`;
}
function rows(sel, list, fn, empty) {
  $(sel + " tbody").innerHTML = list.length ? list.map(fn).join("")
    : `<tr><td colspan="10" class="dim">${empty}</td></tr>`;
}
function pending(d) {
  const parts = d.rollout
    ? [`rolling update: ${d.rollout.done}/${d.rollout.of} on the new generation`] : [];
  if (d.pending == null) {
    const short = d.desired - d.placed;
    if (short > 0) parts.push(`${short}: waiting for the placer`);
  } else if (d.pending) {
    parts.push(`${d.pending}: ${d.reasons.join("; ") || "no reason given"}`);
  }
  return parts.join("; ");
}
function replica(r) {
  const gpus = (r.gpus.join(",") || "-")
    + (r.memory_gib == null ? "" : ` (${Number(r.memory_gib).toFixed(1)} GiB)`);
  const state = r.assigned ? (r.state || "assigned") : "removing";
  const old = r.assigned && r.current === false ? ' <span class="dim">old generation</span>' : "";
  return `<div>${esc(r.node)} · GPU ${esc(gpus)} ${pill(state)}${old}${download(r)}</div>`;
}
// A replica whose agent fetches its model (docs/models.md): percent, rate and ETA.
function download(r) {
  if (r.state !== "downloading" || r.bytes_total == null) return "";
  const pct = r.bytes_total ? 100 * (r.bytes_done || 0) / r.bytes_total : 0;
  const rate = r.download_rate ? ` · ${(r.download_rate / 2 ** 20).toFixed(1)} MiB/s` : "";
  const eta = r.eta_s == null ? "" : ` · ETA ${Math.round(r.eta_s)}s`;
  return ` <span class="dim">${pct.toFixed(0)}% of ${gib(r.bytes_total)} GiB${rate}${eta}</span>`;
}
function render(c) {
  const ready = c.backends.filter((b) => b.state === "ready").length;
  const gpus = c.nodes.flatMap((n) => n.gpus.map((g) => ({node: n.node, ...g})));
  $("#etcd").className = "pill " + (c.etcd.connected ? "connected" : "disconnected");
  $("#etcd").textContent = "etcd " + (c.etcd.connected ? "connected" : "disconnected");
  $("#cards").innerHTML = [
    [c.nodes.length, "nodes"], [gpus.length, "GPUs"],
    [`${ready}/${c.backends.length}`, "backends ready"],
    [Object.keys(c.models).length, "models"],
    [c.request_rate == null ? "-" : num(c.request_rate, 1), "requests/s (this replica)"],
    [c.failovers.length, "recent failovers"],
  ].map(([v, l]) => `<div class="card"><b>${esc(v)}</b><span>${l}</span></div>`).join("");
  rows("#gpus", gpus, (g) => `<tr><td>${esc(g.node)}</td><td>${esc(g.index)}
    ${esc(g.vendor)}</td><td>${esc(g.name)}</td>
    <td>${gib(g.memory_used_bytes)} / ${gib(g.memory_total_bytes)} GiB</td>
    <td>${bar(g.utilization)}</td><td>${unit(g.temperature_c, " °C")}</td>
    <td>${unit(g.power_w, " W")}</td></tr>`, "no GPUs reported");
  rows("#backends", c.backends, (b) => `<tr><td>${esc(b.key)}</td>
    <td>${esc(b.models.join(", "))}</td><td>${pill(b.state)}</td><td>${esc(b.engine)}</td>
    <td class="num">${num(b.latency_ms, 1)}</td><td class="num">${num(b.probe_latency_ms, 1)}</td>
    <td class="num">${num(b.ttft_floor_ms, 2)}</td><td class="num">${num(b.tpot_ms, 2)}</td>
    <td class="num">${b.inflight}</td><td class="num">${b.waiting}</td>
    <td class="num">${num(b.rate, 2)}</td><td class="num">${num(b.cost_per_mtok, 3)}</td>
    <td class="err">${esc(b.error)}</td></tr>`,
    "no backends registered");
  rows("#deployments", c.deployments, (d) => `<tr><td>${esc(d.name)}</td>
    <td>${esc(d.model)}</td><td class="num">${d.desired} / ${d.placed} / ${d.ready}</td>
    <td>${d.replicas.map(replica).join("") || "-"}</td>
    <td class="wrap warn">${esc(pending(d))}</td></tr>`,
    "no deployments (aivmmctl deploy)");
  const targets = (c.routes || []).flatMap((r) => r.targets.map((t) => ({route: r.name, ...t})));
  rows("#routes", targets, (t) => `<tr><td>${esc(t.route)}</td><td>${esc(t.target)}</td>
    <td class="num">${t.weight == null ? "fallback " + t.fallback_rank : t.weight}</td>
    <td class="num">${bar(t.split_pct / 100)}</td><td class="num">${t.requests}</td>
    <td class="num">${t.served_pct == null ? "-" : num(t.served_pct, 1) + "%"}</td>
    <td class="num">${t.errors}</td><td class="num">${num(t.ttft_ms, 1)}</td>
    <td class="num">${num(t.p95_ttft_ms, 1)}</td><td class="num">${t.output_tokens}</td>
    <td class="num">${num(t.tokens_per_s, 1)}</td>
    <td class="wrap warn">${t.tripped ? pill("tripped") + " " + esc(t.tripped.reason) : ""}</td>
    </tr>`, "no routes (aivmmctl route)");
  rows("#failovers", c.failovers.slice(0, 15), (f) => `<tr>
    <td>${esc(new Date(f.at * 1000).toLocaleTimeString())}</td><td>${esc(f.model)}</td>
    <td>${esc(f.backend)}</td><td>${esc(f.reason)}</td></tr>`, "none recently");
  // Per-key usage: only in the answer to an operator key (docs/keys.md).
  $("#keys-section").hidden = !c.keys;
  if (c.keys) rows("#keys", c.keys, (k) => `<tr><td>${esc(k.name)}</td><td>${pill(k.state)}</td>
    <td>${esc(k.models.join(", ") || "all")}</td><td class="num">${k.rpm ?? "-"}</td>
    <td class="num">${k.tpm ?? "-"}</td><td class="num">${k.max_parallel ?? "-"}</td>
    <td class="num">${k.inflight}</td><td class="num">${k.usage.requests}</td>
    <td class="num">${k.usage.errors}</td><td class="num">${k.usage.rate_limited}</td>
    <td class="num">${k.usage.prompt_tokens}</td>
    <td class="num">${k.usage.completion_tokens}</td></tr>`, "no keys (aivmmctl keys create)");
  rows("#audit", c.audit || [], (e) => `<tr>
    <td>${esc(new Date(e.time * 1000).toLocaleString())}</td><td>${esc(e.actor)}</td>
    <td>${esc(e.verb)}</td><td>${esc(e.target)}</td>
    <td class="wrap">${esc(e.detail)}</td></tr>`,
    "no changes recorded (aivmmctl audit)");
  $("#updated").textContent = "updated " + new Date(c.generated_at * 1000).toLocaleTimeString()
    + (c.etcd.error ? " · etcd: " + c.etcd.error : "");
}
async function tick() {
  try {
    const headers = {};
    const key = sessionStorage.getItem("aivmm-key");
    if (key) headers.Authorization = "Bearer " + key;
    const r = await fetch("v1/cluster", {headers, cache: "no-store"});
    if (r.status === 401) {
      const k = prompt("API key for this scheduler");
      if (k) sessionStorage.setItem("aivmm-key", k);
    } else if (r.ok) {
      render(await r.json());
    } else {
      $("#updated").textContent = "error " + r.status;
    }
  } catch (e) {
    $("#updated").textContent = "scheduler unreachable";
  }
  setTimeout(tick, 2000);
}
tick();
</script></body></html>
"""
