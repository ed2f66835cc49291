"""The augmentation worker: claim jobs, compute latents in batches, publish, acknowledge.

Delivery is at least once and publishing is idempotent, so the loop never needs to know
whether a job was seen before: a worker that dies mid-batch leaves its jobs pending, the
store hands them to another worker after the visibility timeout, and the duplicate result
overwrites an identical payload.

Every batch also runs the value check (docs/architecture.md): each context's figure is
recorded in the store's shared estimates and in its payload, and a context whose latents are
confidently harmful is declined instead of published.

One claim is one batch: what does not fit the batch is handed back at once, so no job's
visibility clock runs while it waits behind another batch, and a heartbeat renews the
batch's claims while it computes. A batch whose compute or publish fails is split in halves
and retried, down to single jobs, so only the job that fails alone is dead-lettered.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cache_store.errors import StoreUnavailable
from cache_store.payload import encode_payload
from cache_store.store import AugmentationStore
from cache_store.types import Delivery
from cache_store.value import ValueFigure, ValuePolicy, confidently_harmful
from coprocessor_worker.coprocessor import ValueCheck

log = logging.getLogger(__name__)


class LatentModel(Protocol):
    """What the worker needs of a coprocessor (coprocessor_worker.coprocessor.Coprocessor)."""

    fingerprint: str
    decoder_fingerprint: str

    @property
    def n_latents(self) -> int: ...

    def latents_with_value(
        self, prefixes: Sequence[Sequence[int]], check: ValueCheck
    ) -> list[tuple[torch.Tensor, ValueFigure | None]]: ...


@dataclass(frozen=True)
class WorkerLimits:
    max_jobs: int
    max_tokens: int
    """Padded tokens per batch: batch size times its longest prefix."""
    max_prefix_tokens: int
    """Longest prefix the decoder can take with the latents after it."""
    vocab_size: int
    min_prefix_tokens: int = 1
    """Shortest prefix: longer than the tail that latents replace, if they do."""
    block_s: float = 1.0
    stats_interval_s: float = 10.0
    """How often the worker refreshes the store's deliberate_queue_* gauges."""
    dead_consumer_s: float = 3600.0
    """Consumers of the group idle this long and holding no job are removed."""
    prune_interval_s: float = 600.0
    """How often the worker removes such dead consumers."""


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Counter(
            "deliberate_worker_jobs_total",
            "Jobs finished by outcome (done, declined, failed, released, error)",
            ["outcome"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "deliberate_worker_batch_size",
            "Jobs per computed batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=registry,
        )
        self.compute_seconds = Histogram(
            "deliberate_worker_compute_seconds",
            "Time to compute one batch of latents",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.value_change = Histogram(
            "deliberate_worker_value_change_ratio",
            "The value check's measured perplexity change per context (< 0: latents help)",
            buckets=(-0.2, -0.1, -0.05, -0.02, -0.01, 0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
            registry=registry,
        )
        self.value_estimate = Gauge(
            "deliberate_worker_value_estimate_ratio",
            "Running value-check estimate of the perplexity change over all tenants, and its "
            "upper confidence bound (what the serve/decline rule reads)",
            ["bound"],
            registry=registry,
        )
        self.queue_lag = Gauge(
            "deliberate_worker_queue_lag_seconds",
            "How long the oldest job of the latest claim waited in the queue (0 when a claim "
            "finds the queue empty)",
            registry=registry,
        )
        # Every outcome from the start, so rates and alerts see zeros, not absent series.
        for outcome in ("done", "declined", "failed", "released", "error"):
            self.jobs.labels(outcome=outcome)


def poison_reason(delivery: Delivery, model: LatentModel, limits: WorkerLimits) -> str | None:
    """Why a job can never succeed on this worker, or None if it can."""
    job = delivery.job
    if job.decoder_fp != model.decoder_fingerprint:
        return (
            f"job is for decoder {job.decoder_fp}, this worker serves {model.decoder_fingerprint}"
        )
    if job.coprocessor_fp != model.fingerprint:
        return f"job is for coprocessor {job.coprocessor_fp}, this worker has {model.fingerprint}"
    if not job.token_ids:
        return "empty prefix"
    if len(job.token_ids) < limits.min_prefix_tokens:
        return f"prefix of {len(job.token_ids)} tokens is shorter than {limits.min_prefix_tokens}"
    if len(job.token_ids) > limits.max_prefix_tokens:
        return f"prefix of {len(job.token_ids)} tokens exceeds {limits.max_prefix_tokens}"
    if min(job.token_ids) < 0 or max(job.token_ids) >= limits.vocab_size:
        return f"token ids outside the vocabulary [0, {limits.vocab_size})"
    return None


def plan_batches(deliveries: Sequence[Delivery], limits: WorkerLimits) -> list[list[Delivery]]:
    """Group by similar length so padding stays small, within the job and token budgets."""
    batches: list[list[Delivery]] = []
    batch: list[Delivery] = []
    for delivery in sorted(deliveries, key=lambda d: len(d.job.token_ids)):
        longest = len(delivery.job.token_ids)  # sorted: the newcomer is the longest
        if batch and (
            len(batch) >= limits.max_jobs or (len(batch) + 1) * longest > limits.max_tokens
        ):
            batches.append(batch)
            batch = []
        batch.append(delivery)
    if batch:
        batches.append(batch)
    return batches


def take_batch(
    deliveries: Sequence[Delivery], limits: WorkerLimits
) -> tuple[list[Delivery], list[Delivery]]:
    """The one batch to compute now, and the rest of the claim to hand back: the planned
    batch that holds the job waiting longest, so a long prefix among many short ones is not
    passed over claim after claim."""
    batches = plan_batches(deliveries, limits)
    if not batches:
        return [], []
    oldest = min(deliveries, key=lambda d: d.job.enqueued_at)
    chosen = next(b for b in batches if any(d is oldest for d in b))
    return chosen, [d for b in batches if b is not chosen for d in b]


def split_batch(batch: Sequence[Delivery]) -> list[list[Delivery]]:
    """Halves of a batch to retry apart after it failed (a single job stays whole)."""
    if len(batch) <= 1:
        return [list(batch)]
    middle = len(batch) // 2
    return [list(batch[:middle]), list(batch[middle:])]


def failure_reason(exc: BaseException, *, computing: bool) -> str:
    """The dead letter's reason for a job that failed alone, naming the error."""
    what = "computing its latents" if computing else "publishing its result"
    detail = str(exc).strip() or "(no message)"
    return f"{what} failed on its own, in a batch of one: {type(exc).__name__}: {detail}"


class AugmentationWorker:
    def __init__(
        self,
        store: AugmentationStore,
        model: LatentModel,
        *,
        consumer: str,
        limits: WorkerLimits,
        metrics: WorkerMetrics,
        check: ValueCheck | None = None,
        policy: ValuePolicy | None = None,
        payload_secret: bytes | None = None,
    ) -> None:
        self.store = store
        self.model = model
        self.consumer = consumer
        self.limits = limits
        self.metrics = metrics
        self.check = check or ValueCheck()
        self.policy = policy or ValuePolicy()
        self.payload_secret = payload_secret
        """Signs every payload (servers that hold it accept no unsigned latents)."""
        self.ready = False
        self.outcomes: collections.Counter[str] = collections.Counter()
        """Jobs by outcome in this process (the metric's values, readable without scraping)."""
        self._holding: dict[str, Delivery] = {}
        """The batch's jobs not finished yet: what the heartbeat renews."""

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] += 1
        self.metrics.jobs.labels(outcome=outcome).inc()

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set; the batch in hand is finished, the rest handed back."""
        self.ready = True
        log.info("worker %s started", self.consumer)
        next_stats = 0.0
        next_prune = time.monotonic() + self.limits.prune_interval_s
        try:
            while not stop.is_set():
                try:
                    if time.monotonic() >= next_stats:
                        # Nothing else reads the queue's depth into Prometheus: the workers
                        # watch the queue, so they keep its deliberate_queue_* gauges current.
                        next_stats = time.monotonic() + self.limits.stats_interval_s
                        await self.store.queue_stats()
                        await self._refresh_value_gauges()
                    if time.monotonic() >= next_prune:
                        # Workers that stopped or restarted under a new name leave consumers
                        # behind in the group; any worker may remove those that hold nothing.
                        next_prune = time.monotonic() + self.limits.prune_interval_s
                        await self.store.prune_consumers(
                            self.limits.dead_consumer_s, keep=self.consumer
                        )
                    await self.step(stop)
                except Exception:  # store outage or a bug in one batch: keep the worker alive
                    log.exception("worker step failed; retrying")
                    self._count("error")
                    await _sleep_unless(stop, 1.0)
        finally:
            self.ready = False
            log.info("worker %s stopped: %s", self.consumer, dict(self.outcomes))

    async def step(self, stop: asyncio.Event | None = None) -> int:
        """Claim one batch of jobs and finish it; returns how many jobs were claimed."""
        deliveries = await self.store.claim_jobs(
            self.consumer, self.limits.max_jobs, self.limits.block_s
        )
        if not deliveries:
            self.metrics.queue_lag.set(0.0)  # nothing waited: a stale value would hold alerts
            return 0
        now = time.time()
        self.metrics.queue_lag.set(max(now - d.job.enqueued_at for d in deliveries))
        runnable = []
        for delivery in deliveries:
            reason = poison_reason(delivery, self.model, self.limits)
            if reason is None:
                runnable.append(delivery)
            else:
                log.warning("dead-lettering job %s: %s", delivery.job.key, reason)
                await self.store.fail(delivery, reason)
                self._count("failed")
        batch, rest = take_batch(runnable, self.limits)
        if stop is not None and stop.is_set():
            batch, rest = [], runnable
            log.info("stopping: releasing %d claimed jobs for other workers", len(rest))
        # What does not fit this batch goes back at once (its delivery not counted): other
        # workers may take it now, and its visibility clock does not run while it waits.
        for delivery in rest:
            await self.store.release(delivery)
            self._count("released")
        if batch:
            await self._compute_and_publish(batch)
        return len(deliveries)

    async def _compute_and_publish(self, batch: list[Delivery]) -> None:
        self._holding = {d.stream_id: d for d in batch}
        heartbeat = asyncio.create_task(self._heartbeat(), name=f"heartbeat-{self.consumer}")
        try:
            await self._attempt(batch)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            self._holding = {}

    async def _heartbeat(self) -> None:
        """Renew the batch's claims every third of the visibility timeout while it computes,
        so a batch slower than the timeout is not reclaimed and computed again elsewhere
        (nor dead-lettered after enough reclaims while this worker still computes it)."""
        interval = self.store.config.visibility_timeout_s / 3
        while True:
            await asyncio.sleep(interval)
            held = list(self._holding.values())
            if not held:
                continue
            try:
                renewed = await self.store.renew(held)
            except Exception as exc:  # an outage: try again at the next beat
                log.warning("heartbeat: could not renew %d claims: %s", len(held), exc)
                continue
            kept = {d.stream_id for d in renewed}
            for delivery in held:
                if delivery.stream_id not in kept and self._holding.pop(delivery.stream_id, None):
                    # Still computed and published (idempotent), but no longer renewed.
                    log.warning("heartbeat: job %s was taken over meanwhile", delivery.job.key)

    async def _attempt(self, batch: list[Delivery]) -> None:
        """Compute and publish a batch; on failure retry its failing part in halves, down to
        single jobs: only a job that fails on its own is dead-lettered. A store outage is
        not the job's fault and propagates (the jobs stay claimed and are reclaimed)."""
        started = time.perf_counter()
        try:
            # The forward passes hold the GIL rarely; a thread keeps the event loop (and, in
            # the embedded server, request handling and the heartbeat) responsive meanwhile.
            results = await asyncio.to_thread(
                self.model.latents_with_value, [d.job.token_ids for d in batch], self.check
            )
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for a batch of {len(batch)} prefixes")
        except Exception as exc:  # out of memory, a kernel error, a bug for one prefix
            log.warning("computing a batch of %d failed: %r", len(batch), exc)
            await self._isolate(batch, batch, {d.stream_id: exc for d in batch}, computing=True)
            return
        self.metrics.compute_seconds.observe(time.perf_counter() - started)
        self.metrics.batch_size.observe(len(batch))
        failed: dict[str, Exception] = {}
        for delivery, (tensor, figure) in zip(batch, results, strict=True):
            try:
                await self._finish(delivery, tensor, figure)
            except StoreUnavailable:
                raise
            except Exception as exc:  # NaN latents, a payload too large: this job's result
                log.warning("job %s: its result cannot be published: %r", delivery.job.key, exc)
                failed[delivery.stream_id] = exc
        if failed:
            guilty = [d for d in batch if d.stream_id in failed]
            await self._isolate(batch, guilty, failed, computing=False)

    async def _isolate(
        self,
        batch: list[Delivery],
        guilty: list[Delivery],
        errors: dict[str, Exception],
        *,
        computing: bool,
    ) -> None:
        if len(batch) > 1:
            # A batch effect (memory, padding) or one bad prefix: retry apart to find out.
            for part in split_batch(guilty):
                await self._attempt(part)
            return
        for delivery in guilty:
            reason = failure_reason(errors[delivery.stream_id], computing=computing)
            log.warning("dead-lettering job %s: %s", delivery.job.key, reason)
            await self.store.fail(delivery, reason)
            self._holding.pop(delivery.stream_id, None)
            self._count("failed")

    async def _finish(
        self, delivery: Delivery, tensor: torch.Tensor, figure: ValueFigure | None
    ) -> None:
        job = delivery.job
        if figure is not None and not (
            math.isfinite(figure.delta) and math.isfinite(figure.std_error)
        ):
            raise ValueError(f"the value check's figure is not finite: {figure}")
        # Built and verified before anything about the job is recorded: a job whose result
        # cannot be published is retried or failed without leaving its figure behind.
        payload = encode_payload(
            tensor,
            key=job.key,
            decoder_fp=job.decoder_fp,
            coprocessor_fp=job.coprocessor_fp,
            prefix_len=job.prefix_len,
            value=figure,
            secret=self.payload_secret,
        )
        self.store.verify_payload(delivery, payload)
        if figure is not None:
            # Recorded before the payload is published, so a server that sees the hit
            # already counts this context's evidence.
            await self.store.record_value(job.coprocessor_fp, job.tenant, figure.delta)
            self.metrics.value_change.observe(figure.relative_change)
        if figure is not None and confidently_harmful(figure, self.policy):
            await self.store.decline(delivery, figure, _decline_reason(figure))
            self._count("declined")
        else:
            await self.store.publish(delivery, payload)
            self._count("done")
        self._holding.pop(delivery.stream_id, None)

    async def _refresh_value_gauges(self) -> None:
        """The overall value-check estimate into its gauges (refreshed with the queue's)."""
        # Any tenant name will do: only the estimate over all tenants is read out here.
        _, overall = await self.store.value_estimates(self.model.fingerprint, "")
        if overall.n:
            self.metrics.value_estimate.labels("mean").set(math.expm1(overall.mean))
            upper = overall.upper(self.policy.z)
            if math.isfinite(upper):
                self.metrics.value_estimate.labels("upper").set(math.expm1(upper))


def _decline_reason(figure: ValueFigure) -> str:
    return (
        f"the value check measured {figure.relative_change:+.1%} perplexity on this context's "
        f"own tail ({figure.tokens} tokens, standard error {figure.std_error:.3f} nats): "
        "confidently harmful, answered plainly"
    )


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
