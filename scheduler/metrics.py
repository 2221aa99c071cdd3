"""The scheduler's Prometheus metrics, on the app's own registry (no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from sub-millisecond proxying up to long generations.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 120.0, 300.0)


class SchedulerMetrics:
    """Every metric the scheduler exports; one instance per application."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "aivmm_scheduler_requests_total", "Client requests by model, backend and status",
            ["model", "backend", "status"], registry=r)
        self.duration = Histogram(
            "aivmm_scheduler_request_duration_seconds",
            "Time from request received to last byte sent", ["model"], buckets=_BUCKETS,
            registry=r)
        self.ttfb = Histogram(
            "aivmm_scheduler_time_to_first_byte_seconds",
            "Time from sending upstream to the backend's first body byte",
            ["model", "backend"], buckets=_BUCKETS, registry=r)
        self.failovers = Counter(
            "aivmm_scheduler_failovers_total",
            "Attempts retried on another backend, by the backend that failed and why",
            ["model", "backend", "reason"], registry=r)
        self.budget_refusals = Counter(
            "aivmm_scheduler_retry_budget_refusals_total",
            "Retries not made because the retry budget was spent", ["model"], registry=r)
        self.ejections = Counter(
            "aivmm_scheduler_ejections_total", "Backends ejected locally as outliers",
            ["backend"], registry=r)
        self.broken_streams = Counter(
            "aivmm_scheduler_broken_streams_total",
            "Responses that broke after bytes had reached the client", ["model", "backend"],
            registry=r)
        self.client_aborts = Counter(
            "aivmm_scheduler_client_aborts_total",
            "Requests ended by the client: it disconnected, or stopped reading for "
            "client_write_timeout", ["reason"], registry=r)
        self.inflight = Gauge(
            "aivmm_scheduler_inflight_requests", "Requests being served now", registry=r)
        self.queued = Gauge(
            "aivmm_scheduler_queued_requests",
            "Requests waiting for a usable backend", registry=r)
        self.backends = Gauge(
            "aivmm_scheduler_backends", "Backends known to this replica by state",
            ["state"], registry=r)
        self.etcd_connected = Gauge(
            "aivmm_scheduler_etcd_watch_up",
            "1 while the etcd watch is in sync, 0 while routing on the last view", registry=r)
        self.etcd_resyncs = Counter(
            "aivmm_scheduler_etcd_resyncs_total",
            "Full re-reads of the backend table from etcd", registry=r)
        self.bad_records = Counter(
            "aivmm_scheduler_bad_records_total", "Backend records skipped as unparsable",
            registry=r)
        self.placer_leader = Gauge(
            "aivmm_placer_leader", "1 while this scheduler is the elected placer", registry=r)
        self.placer_writes = Counter(
            "aivmm_placer_writes_total", "Assignment and status keys written or deleted",
            registry=r)
        self.placer_pending = Gauge(
            "aivmm_placer_pending_replicas",
            "Replicas the placer could not place (as of its last pass)", registry=r)
        self.placer_bad_records = Counter(
            "aivmm_placer_bad_records_total", "Records the placer skipped as unusable",
            registry=r)
        # Every metric with a "backend" label, with its label names: a backend that leaves
        # the table takes its series with it, so /metrics does not grow with every backend
        # ever seen.
        self._per_backend: tuple[tuple[Counter | Histogram, tuple[str, ...]], ...] = (
            (self.requests, ("model", "backend", "status")),
            (self.ttfb, ("model", "backend")),
            (self.failovers, ("model", "backend", "reason")),
            (self.ejections, ("backend",)),
            (self.broken_streams, ("model", "backend")))

    def forget_backend(self, key: str) -> None:
        """Drop every series labelled ``backend=key``."""
        for metric, names in self._per_backend:
            doomed = {tuple(sample.labels[n] for n in names)
                      for family in metric.collect() for sample in family.samples
                      if sample.labels.get("backend") == key}
            for values in doomed:
                metric.remove(*values)
