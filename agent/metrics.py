"""The agent's Prometheus metrics, on the app's own registry (docs/contracts.md: Metrics)."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge

from common.records import STATES, BackendRecord, GpuRecord


class AgentMetrics:
    """Every metric the agent exports; one instance per app."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self.node = node
        gpu = ("node", "gpu", "vendor")
        self.gpu_memory_total = Gauge("aivmm_gpu_memory_total_bytes", "GPU memory size",
                                      gpu, registry=registry)
        self.gpu_memory_used = Gauge("aivmm_gpu_memory_used_bytes", "GPU memory in use",
                                     gpu, registry=registry)
        self.gpu_utilization = Gauge("aivmm_gpu_utilization_ratio", "GPU busy ratio (0..1)",
                                     gpu, registry=registry)
        self.gpu_temperature = Gauge("aivmm_gpu_temperature_celsius", "GPU temperature",
                                     gpu, registry=registry)
        self.gpu_power = Gauge("aivmm_gpu_power_watts", "GPU power draw", gpu,
                               registry=registry)
        b = ("node", "backend", "model")
        self.backend_up = Gauge("aivmm_backend_up", "1 when the backend is ready", b,
                                registry=registry)
        self.backend_state = Gauge("aivmm_backend_state",
                                   "1 for the backend's current state, 0 for the others",
                                   (*b, "state"), registry=registry)
        self.backend_error = Gauge("aivmm_backend_error",
                                   "1 while the backend has an error (missing image, crash, "
                                   "placement)", b, registry=registry)
        self.backend_restarts = Counter("aivmm_backend_restarts_total",
                                        "Restarts of crashed backend containers", b,
                                        registry=registry)
        self.probe_latency = Gauge("aivmm_backend_probe_latency_seconds",
                                   "EWMA of the backend's health probe latency", b,
                                   registry=registry)
        self.heartbeats = Counter("aivmm_agent_heartbeats_total",
                                  "Heartbeats written to etcd", ("node",), registry=registry)
        self.etcd_errors = Counter("aivmm_agent_etcd_errors_total",
                                   "Failed etcd operations", ("node",), registry=registry)
        self.bad_records = Counter("aivmm_agent_bad_records_total",
                                   "etcd records (assignments) skipped as unusable", ("node",),
                                   registry=registry)
        # Fetching models into models_dir (docs/models.md).
        self.model_bytes = Counter("aivmm_model_download_bytes_total",
                                   "Bytes of model files fetched from the hub", ("node",),
                                   registry=registry)
        self.model_failures = Counter("aivmm_model_download_failures_total",
                                      "Model fetches that failed, by reason (hub, corrupt, "
                                      "disk, refused)", ("node", "reason"), registry=registry)
        self.model_downloads = Counter("aivmm_model_downloads_total",
                                       "Models fetched whole and verified", ("node",),
                                       registry=registry)
        self._gpu_labels: set[tuple[str, str, str]] = set()
        self._backend_labels: set[tuple[str, str, str]] = set()

    def gpus(self, gpus: list[GpuRecord]) -> None:
        """Set the GPU gauges; a figure the driver does not give is left out, not zero."""
        seen: set[tuple[str, str, str]] = set()
        for g in gpus:
            labels = (self.node, str(g.index), g.vendor)
            seen.add(labels)
            for gauge, value in ((self.gpu_memory_total, g.memory_total_bytes),
                                 (self.gpu_memory_used, g.memory_used_bytes),
                                 (self.gpu_utilization, g.utilization),
                                 (self.gpu_temperature, g.temperature_c),
                                 (self.gpu_power, g.power_w)):
                if value is not None:
                    gauge.labels(*labels).set(value)
        for gone in self._gpu_labels - seen:
            for gauge in (self.gpu_memory_total, self.gpu_memory_used, self.gpu_utilization,
                          self.gpu_temperature, self.gpu_power):
                with contextlib.suppress(KeyError):
                    gauge.remove(*gone)
        self._gpu_labels = seen

    def backend(self, record: BackendRecord) -> None:
        model = record.models[0] if record.models else ""
        labels = (self.node, record.name, model)
        self._backend_labels.add(labels)
        self.backend_up.labels(*labels).set(1 if record.state == "ready" else 0)
        for state in STATES:
            self.backend_state.labels(*labels, state).set(1 if record.state == state else 0)
        self.backend_error.labels(*labels).set(1 if record.error else 0)
        if record.probe_latency_ms is not None:
            self.probe_latency.labels(*labels).set(record.probe_latency_ms / 1000)
        self.backend_restarts.labels(*labels)  # export 0 before the first restart

    def restarted(self, name: str, model: str) -> None:
        self.backend_restarts.labels(self.node, name, model).inc()

    def forget(self, name: str) -> None:
        """Drop a removed backend's series (an undeployed replica must not linger at 0)."""
        for labels in [lb for lb in self._backend_labels if lb[1] == name]:
            self._backend_labels.discard(labels)
            for metric in (self.backend_up, self.backend_error, self.backend_restarts,
                           self.probe_latency):
                with contextlib.suppress(KeyError):
                    metric.remove(*labels)
            for state in STATES:
                with contextlib.suppress(KeyError):
                    self.backend_state.remove(*labels, state)
