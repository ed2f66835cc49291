"""Prometheus metrics of the store, registered against a registry the caller passes in."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

# Lookups sit on the request path with a budget of a few milliseconds: resolve that range.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)  # fmt: skip


class StoreMetrics:
    """All store metrics. One instance per registry: share it between stores of one process."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        try:
            self._create(registry)
        except ValueError as exc:
            raise ValueError(
                f"store metrics are already registered in this registry ({exc}); pass the "
                "existing StoreMetrics as metrics=..., or a fresh CollectorRegistry"
            ) from exc

    def _create(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "deliberate_store_hits_total",
            "Payload lookups that returned verified latents",
            registry=registry,
        )
        self.misses = Counter(
            "deliberate_store_misses_total",
            "Payload lookups that returned nothing (absent, expired or rejected)",
            registry=registry,
        )
        self.enqueues = Counter(
            "deliberate_store_enqueue_total",
            "Enqueue calls by outcome (queue_full counts backpressure refusals)",
            ["outcome"],
            registry=registry,
        )
        self.rejected = Counter(
            "deliberate_store_payload_rejected_total",
            "Payloads that failed verification, by reason",
            ["reason"],
            registry=registry,
        )
        self.errors = Counter(
            "deliberate_store_errors_total",
            "Store operations that failed (backend unavailable or timed out), by operation",
            ["op"],
            registry=registry,
        )
        self.latency = Histogram(
            "deliberate_store_operation_seconds",
            "Latency of store operations",
            ["op", "backend"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.reclaimed = Counter(
            "deliberate_store_reclaimed_total",
            "Jobs taken back from a consumer idle past the visibility timeout",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "deliberate_store_dead_lettered_total",
            "Jobs moved to the dead-letter stream (key marked failed)",
            registry=registry,
        )
        self.published = Counter(
            "deliberate_store_published_total",
            "Payloads published by workers",
            registry=registry,
        )
        self.declined = Counter(
            "deliberate_store_declined_total",
            "Jobs finished without a payload because the value check found their latents "
            "confidently harmful (key marked declined)",
            registry=registry,
        )
        self.payload_bytes = Histogram(
            "deliberate_store_payload_bytes",
            "Size of published payloads",
            buckets=(4096, 16384, 65536, 262144, 1 << 20, 4 << 20, 16 << 20),
            registry=registry,
        )
        self.queue_length = Gauge(
            "deliberate_queue_length",
            "Outstanding jobs (waiting plus in workers' hands), as of the last queue_stats()",
            registry=registry,
        )
        self.queue_pending = Gauge(
            "deliberate_queue_pending",
            "Jobs delivered and not yet acknowledged, as of the last queue_stats()",
            registry=registry,
        )
        self.queue_oldest_age = Gauge(
            "deliberate_queue_oldest_age_seconds",
            "Age of the oldest outstanding job, as of the last queue_stats()",
            registry=registry,
        )
        self.dead_letters = Gauge(
            "deliberate_queue_dead_letters",
            "Entries in the dead-letter stream, as of the last queue_stats()",
            registry=registry,
        )
        self.breaker_skipped = Counter(
            "deliberate_store_breaker_skipped_total",
            "Store operations skipped because the circuit breaker was open, by operation",
            ["op"],
            registry=registry,
        )
        self.renewed = Counter(
            "deliberate_store_renewed_total",
            "Claims renewed by a worker's heartbeat while it computes (idle clock restarted, "
            "no delivery used up)",
            registry=registry,
        )
        self.renew_lost = Counter(
            "deliberate_store_renew_lost_total",
            "Claims a heartbeat found no longer in its consumer's hands (taken over or finished)",
            registry=registry,
        )
        self.orphaned_claims = Counter(
            "deliberate_store_orphaned_claims_total",
            "Pending claims released by enqueue because their stream entry was gone (lost in "
            "a failover, XTRIM or DEL), so the key could be enqueued again",
            registry=registry,
        )
        self.consumers_removed = Counter(
            "deliberate_store_consumers_removed_total",
            "Idle consumers with no pending jobs removed from the consumer group",
            registry=registry,
        )
        self.requeued = Counter(
            "deliberate_store_requeued_total",
            "Dead letters put back on the job queue (deliberate dlq requeue)",
            registry=registry,
        )
        self.breaker_opened = Counter(
            "deliberate_store_breaker_opened_total",
            "Times the store's circuit breaker opened (consecutive failures reached the limit)",
            registry=registry,
        )
