"""The server's Prometheus metrics, registered on a registry the app is given."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

# Decoding on a CPU is slow and on a GPU fast: the buckets span both.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
_LOOKUP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "deliberate_requests_total",
            "Generation requests by endpoint and augmentation status",
            ["endpoint", "status"],
            registry=registry,
        )
        self.disconnected = Counter(
            "deliberate_requests_disconnected_total",
            "Generation requests whose client went away before the answer; their engine "
            "requests were aborted",
            ["endpoint"],
            registry=registry,
        )
        for endpoint in ("completions", "chat"):  # exported from the start: rates see zeros
            self.disconnected.labels(endpoint=endpoint)
        self.time_to_first_token = Histogram(
            "deliberate_time_to_first_token_seconds",
            "Time from request arrival to the first generated token",
            ["status"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_duration = Histogram(
            "deliberate_request_duration_seconds",
            "Time from request arrival to the last generated token",
            ["status"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_lookup_seconds = Histogram(
            "deliberate_store_lookup_seconds",
            "Store calls on the request path (get, enqueue)",
            ["op"],
            buckets=_LOOKUP_BUCKETS,
            registry=registry,
        )
        self.rejected = Counter(
            "deliberate_rejected_requests_total",
            "Requests refused with a 4xx, by HTTP status",
            ["code"],
            registry=registry,
        )
