"""The asyncio interface both backends implement, and the logic they share.

Public methods here validate arguments, verify payloads, bound every call by the operation
timeout, translate backend outages into `StoreUnavailable` and record metrics; backends only
implement the underscored primitives. So verification and accounting cannot drift apart
between Redis and the in-memory store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType

from cache_store.breaker import CircuitBreaker
from cache_store.errors import (
    CircuitOpen,
    MalformedJob,
    PayloadRejected,
    PayloadTooLarge,
    StoreRefused,
    StoreUnavailable,
)
from cache_store.keys import validate_key, value_key
from cache_store.metrics import StoreMetrics
from cache_store.payload import TOO_LARGE, Payload, PayloadExpectation, decode_payload
from cache_store.types import (
    DeadLetter,
    Delivery,
    EnqueueOutcome,
    Job,
    KeyStatus,
    QueueStats,
    StoreConfig,
)
from cache_store.value import ValueEstimate, ValueFigure

log = logging.getLogger(__name__)

MAX_REASON_CHARS = 2000


class AugmentationStore(ABC):
    """Payloads, key states and the job queue. Use as `async with open_store(...) as store`."""

    backend: str = "abstract"
    _transient_errors: tuple[type[BaseException], ...] = ()
    """Backend exceptions that mean "unavailable" (become StoreUnavailable)."""
    _refusal_errors: tuple[type[BaseException], ...] = ()
    """Backend error replies (a subset of the above) that become StoreRefused."""

    def __init__(self, config: StoreConfig, metrics: StoreMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._closed = False
        self.breaker = CircuitBreaker(config.breaker_failures, config.breaker_cooldown_s)
        self._refusals_logged: dict[str, float] = {}

    # ---------------------------------------------------------------- request side

    async def get_payload(
        self, key: str, expected: PayloadExpectation, *, timeout_s: float | None = None
    ) -> Payload | None:
        """Verified latents of `key`, or None. A payload that fails verification is counted
        (deliberate_store_payload_rejected_total{reason}), deleted and reported as a miss.
        `timeout_s` overrides op_timeout_s, e.g. with the request path's lookup budget."""
        validate_key(key)
        if expected.key != key:
            raise ValueError(f"expectation is for key {expected.key}, not {key}")
        async with self._op("get", timeout_s):
            data = await self._get_payload_bytes(key)
        if data is None:
            self.metrics.misses.inc()
            return None
        try:
            if len(data) > self.config.max_payload_bytes:
                raise PayloadRejected(
                    TOO_LARGE,
                    f"{len(data)} bytes over max_payload_bytes={self.config.max_payload_bytes}",
                )
            payload = decode_payload(data, expected=expected)
        except PayloadRejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            self.metrics.misses.inc()
            log.warning("store: payload of key %s rejected and deleted: %s", key, exc)
            # Deleting lets the next miss enqueue a fresh job instead of reporting
            # "already ready" until the bad payload's TTL runs out.
            with contextlib.suppress(StoreUnavailable):
                async with self._op("discard"):
                    await self._discard_payload(key, data)
            return None
        self.metrics.hits.inc()
        return payload

    async def status(self, key: str) -> KeyStatus:
        validate_key(key)
        async with self._op("status"):
            return await self._status(key)

    async def enqueue(self, job: Job, *, timeout_s: float | None = None) -> EnqueueOutcome:
        """Add a job unless its key is ready, failed or already pending (atomic dedup), or
        the queue is full (backpressure: counted, the caller answers plainly). Raises
        MalformedJob if the job's key does not match its fields (use Job.create).
        `timeout_s` overrides op_timeout_s, e.g. with the request path's budget."""
        job.verify()
        async with self._op("enqueue", timeout_s):
            outcome = await self._enqueue(job)
        self.metrics.enqueues.labels(outcome.value).inc()
        return outcome

    async def wait_ready(self, key: str, timeout_s: float) -> KeyStatus:
        """Wait until `key` is no longer pending (ready, failed or absent) or `timeout_s`
        passes; returns the last status seen. Woken by push notifications; re-checks every
        poll_interval_s only while notifications are not available."""
        validate_key(key)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout_s)
        with self._waiter(key) as event:
            await self._start_notifications()
            while True:
                status = await self.status(key)
                remaining = deadline - loop.time()
                if status.terminal or remaining <= 0:
                    return status
                if not self._notifications_active():
                    remaining = min(remaining, self.config.poll_interval_s)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        await event.wait()
                event.clear()
                if self._closed:
                    return status  # shutting down: give waiters the last answer, not an error

    # ---------------------------------------------------------------- worker side

    async def claim_jobs(
        self, consumer: str, max_jobs: int = 1, block_s: float = 1.0
    ) -> list[Delivery]:
        """Up to `max_jobs` jobs for `consumer`: first those idle past the visibility timeout
        in any consumer's hands (reclaim), then new ones, waiting up to `block_s` for them.
        Jobs past max_deliveries are dead-lettered here and not returned."""
        if not consumer:
            raise ValueError("consumer name is empty; use a stable per-process name")
        if max_jobs < 1:
            raise ValueError(f"max_jobs must be at least 1, got {max_jobs}")
        async with self._op("claim", self.config.op_timeout_s + max(0.0, block_s)):
            return await self._claim_jobs(consumer, max_jobs, max(0.0, block_s))

    async def publish(self, delivery: Delivery, payload_bytes: bytes) -> None:
        """Store the payload (with TTL), mark the key ready, wake waiters, ack the job.
        Idempotent: publishing a redelivered job again is harmless. The payload is verified
        against the job first, so a worker bug cannot store latents under a wrong key."""
        payload = self.verify_payload(delivery, payload_bytes)
        async with self._op("publish"):
            await self._publish(delivery, payload_bytes, payload.value)
        self.metrics.published.inc()
        self.metrics.payload_bytes.observe(len(payload_bytes))

    def verify_payload(self, delivery: Delivery, payload_bytes: bytes) -> Payload:
        """The checks `publish` makes, without storing anything: raises PayloadTooLarge or
        PayloadRejected (counted) unless the payload may be published for this job. A worker
        calls it before recording anything about the job, so a job whose result cannot be
        published leaves no trace but its failure."""
        size = len(payload_bytes)
        if size > self.config.max_payload_bytes:
            self.metrics.rejected.labels(TOO_LARGE).inc()
            raise PayloadTooLarge(size, self.config.max_payload_bytes)
        try:
            return decode_payload(payload_bytes, expected=PayloadExpectation.for_job(delivery.job))
        except PayloadRejected as exc:
            self.metrics.rejected.labels(exc.reason).inc()
            raise

    async def decline(self, delivery: Delivery, value: ValueFigure, reason: str) -> None:
        """Finish a job without a payload because its latents were measured harmful: the key
        is marked declined with the figure (not dead-lettered: nothing failed) and refuses
        new jobs until declined_ttl_s passes."""
        async with self._op("decline"):
            await self._decline(delivery, _clip(reason), value)
        self.metrics.declined.inc()

    async def record_value(self, coprocessor_fp: str, tenant: str, delta: float) -> None:
        """Add one context's value-check figure (nats per token) to the running estimates of
        its tenant and of all tenants, which every server and worker reads."""
        if not math.isfinite(delta):
            raise ValueError(f"a value-check figure must be finite, got {delta}")
        async with self._op("record_value"):
            for key in (value_key(coprocessor_fp, tenant), value_key(coprocessor_fp, None)):
                await self._add_value(key, delta)

    async def value_estimates(
        self, coprocessor_fp: str, tenant: str, *, timeout_s: float | None = None
    ) -> tuple[ValueEstimate, ValueEstimate]:
        """(the tenant's, all tenants') running value-check estimates of a coprocessor."""
        async with self._op("value_estimates", timeout_s):
            return (
                await self._read_value(value_key(coprocessor_fp, tenant)),
                await self._read_value(value_key(coprocessor_fp, None)),
            )

    async def fail(self, delivery: Delivery, reason: str) -> None:
        """Give up on a job: dead-letter it and mark its key failed with `reason`."""
        async with self._op("fail"):
            await self._dead_letter(delivery, _clip(reason))

    async def release(self, delivery: Delivery) -> None:
        """Hand a job back unfinished (e.g. on SIGTERM); the next claim takes it at once.
        Does not use up one of the job's deliveries."""
        async with self._op("release"):
            await self._release(delivery)

    async def renew(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Extend the claim on jobs a worker is still computing: each entry's idle clock
        restarts, so it is not reclaimed after the visibility timeout, and no delivery is
        used up (Redis: XCLAIM ... JUSTID). Only entries still in their consumer's hands are
        renewed; returns those. A delivery missing from the answer was finished or taken
        over by another consumer meanwhile (counted in deliberate_store_renew_lost_total)."""
        deliveries = list(deliveries)
        if not deliveries:
            return []
        consumers = {d.consumer for d in deliveries}
        if len(consumers) != 1 or not next(iter(consumers)):
            raise ValueError(f"renew takes deliveries of one named consumer, got {consumers}")
        async with self._op("renew"):
            held = await self._renew(deliveries)
        renewed = [d for d in deliveries if d.stream_id in held]
        self.metrics.renewed.inc(len(renewed))
        if len(renewed) < len(deliveries):
            self.metrics.renew_lost.inc(len(deliveries) - len(renewed))
        return renewed

    async def ack(self, delivery: Delivery) -> None:
        """Drop a job without a result (e.g. its key is already ready); the key's pending
        claim is removed so a later miss may enqueue again."""
        async with self._op("ack"):
            await self._ack(delivery)

    async def queue_stats(self) -> QueueStats:
        """Queue depth; also sets the deliberate_queue_* gauges."""
        async with self._op("queue_stats"):
            stats = await self._queue_stats()
        self.metrics.queue_length.set(stats.length)
        self.metrics.queue_pending.set(stats.pending)
        self.metrics.queue_oldest_age.set(stats.oldest_age_s or 0.0)
        self.metrics.dead_letters.set(stats.dead_letters)
        return stats

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        async with self._op("dead_letters"):
            return await self._dead_letters(count)

    async def requeue(self, letter: DeadLetter) -> EnqueueOutcome:
        """Put a dead letter's job back on the queue: its key's failed mark is cleared, the
        job enqueued afresh (new enqueue time, deliveries from 0) and, unless the queue is
        full, the dead letter removed. Raises MalformedJob for a letter that holds no valid
        job (an entry that was never one of ours)."""
        if letter.key is None:
            raise MalformedJob(
                f"dead letter {letter.stream_id} holds no valid job ({letter.reason}); "
                "it cannot be requeued"
            )
        job = Job.from_json(letter.job_json)
        if job.key != letter.key:
            raise MalformedJob(f"dead letter {letter.stream_id} names key {letter.key}, its job "
                               f"is for {job.key}")  # fmt: skip
        job = dataclasses.replace(job, enqueued_at=time.time())
        async with self._op("requeue"):
            await self._clear_failed(job.key)
            outcome = await self._enqueue(job)
            if outcome not in (EnqueueOutcome.QUEUE_FULL, EnqueueOutcome.FAILED):
                # Enqueued, or already ready, pending or declined: no longer a dead job.
                await self._drop_dead_letter(letter.stream_id)
        self.metrics.enqueues.labels(outcome.value).inc()
        if outcome is EnqueueOutcome.ENQUEUED:
            self.metrics.requeued.inc()
        return outcome

    async def prune_consumers(self, idle_s: float, *, keep: str | None = None) -> list[str]:
        """Remove consumers of the group that hold no pending job and have been idle for
        `idle_s` or more (workers that stopped or restarted under a new name); `keep` (the
        caller's own name) is never removed. Atomic per consumer: one that claims a job
        meanwhile is kept. Returns the names removed."""
        if not idle_s > 0:
            raise ValueError(f"idle_s must be positive, got {idle_s}")
        async with self._op("prune_consumers"):
            removed = await self._prune_consumers(idle_s, keep)
        if removed:
            self.metrics.consumers_removed.inc(len(removed))
            log.info("store: removed %d idle consumers: %s", len(removed), ", ".join(removed))
        return removed

    async def ping(self) -> None:
        """Raise StoreUnavailable unless the backend answers (readiness probes)."""
        async with self._op("ping"):
            await self._ping()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._close()

    async def __aenter__(self) -> AugmentationStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- shared machinery

    @contextlib.asynccontextmanager
    async def _op(self, op: str, timeout_s: float | None = None) -> AsyncIterator[None]:
        """Time an operation, bound it, turn backend outages and error replies into
        StoreUnavailable, and feed the circuit breaker (skip the backend while it is open)."""
        if self._closed:
            raise RuntimeError(f"store operation {op!r} after close(); open a new store")
        if not self.breaker.allow():
            self.metrics.breaker_skipped.labels(op).inc()
            raise CircuitOpen(op, self.backend, self.breaker.retry_in())
        start = time.perf_counter()
        settled = False
        try:
            async with asyncio.timeout(
                self.config.op_timeout_s if timeout_s is None else timeout_s
            ):
                await self._prepare()
                yield
            settled = True
            self.breaker.succeeded()
        except TimeoutError as exc:
            settled = True
            self._failed(op)
            raise StoreUnavailable(op, self.backend, "timed out") from exc
        except self._transient_errors as exc:
            settled = True
            self._failed(op)
            if isinstance(exc, self._refusal_errors):
                refused = StoreRefused(op, self.backend, self._refusal_code(exc), exc)
                self._log_refusal(refused)
                raise refused from exc
            raise StoreUnavailable(op, self.backend, f"{type(exc).__name__}: {exc}") from exc
        finally:
            if not settled:
                # Cancelled, or an error that says nothing about the backend (a bug, bad
                # input): neither a success nor a failure of the backend.
                self.breaker.abandoned()
            self.metrics.latency.labels(op, self.backend).observe(time.perf_counter() - start)

    def _refusal_code(self, exc: BaseException) -> str:
        """The error reply's code (its first word), e.g. MISCONF."""
        word = str(exc).split(" ", 1)[0]
        return word if word.isupper() else "ERR"

    def _failed(self, op: str) -> None:
        self.metrics.errors.labels(op).inc()
        opened = self.breaker.opened
        self.breaker.failed()
        if self.breaker.opened > opened:
            self.metrics.breaker_opened.inc()
            log.warning(
                "store: %d failures in a row; skipping %s for %.1f s (circuit breaker)",
                self.breaker.threshold,
                self.backend,
                self.breaker.cooldown_s,
            )

    def _log_refusal(self, refused: StoreRefused) -> None:
        # An error reply repeats on every call while it lasts (a full disk, a BUSY script):
        # one line per reply code every 10 s is enough to see it.
        now = time.monotonic()
        if now - self._refusals_logged.get(refused.code, -1e9) >= 10.0:
            self._refusals_logged[refused.code] = now
            log.warning("store: %s", refused)

    @contextlib.contextmanager
    def _waiter(self, key: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        self._waiters.setdefault(key, set()).add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[key]

    def _notify(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    def _notify_all(self) -> None:
        """Wake every waiter to re-check, e.g. after notifications may have been missed."""
        for events in self._waiters.values():
            for event in events:
                event.set()

    # ---------------------------------------------------------------- backend primitives

    @abstractmethod
    async def _get_payload_bytes(self, key: str) -> bytes | None: ...

    @abstractmethod
    async def _discard_payload(self, key: str, data: bytes) -> None:
        """Delete the payload of `key` if it still is `data`."""

    @abstractmethod
    async def _status(self, key: str) -> KeyStatus: ...

    @abstractmethod
    async def _enqueue(self, job: Job) -> EnqueueOutcome: ...

    @abstractmethod
    async def _claim_jobs(self, consumer: str, max_jobs: int, block_s: float) -> list[Delivery]: ...

    @abstractmethod
    async def _publish(
        self, delivery: Delivery, payload_bytes: bytes, value: ValueFigure | None
    ) -> None: ...

    @abstractmethod
    async def _decline(self, delivery: Delivery, reason: str, value: ValueFigure) -> None: ...

    @abstractmethod
    async def _add_value(self, key: str, delta: float) -> None:
        """Add delta (and its square, and one to the count) to the estimate at `key`."""

    @abstractmethod
    async def _read_value(self, key: str) -> ValueEstimate: ...

    @abstractmethod
    async def _dead_letter(self, delivery: Delivery, reason: str) -> None: ...

    @abstractmethod
    async def _release(self, delivery: Delivery) -> None: ...

    @abstractmethod
    async def _ack(self, delivery: Delivery) -> None: ...

    @abstractmethod
    async def _renew(self, deliveries: list[Delivery]) -> set[str]:
        """Restart the idle clock of the entries still held by their (one) consumer, without
        counting a delivery; return the stream ids renewed."""

    @abstractmethod
    async def _clear_failed(self, key: str) -> None:
        """Remove the failed mark of `key`, if it has one (any other state is left alone)."""

    @abstractmethod
    async def _drop_dead_letter(self, stream_id: str) -> None: ...

    @abstractmethod
    async def _prune_consumers(self, idle_s: float, keep: str | None) -> list[str]: ...

    @abstractmethod
    async def _queue_stats(self) -> QueueStats: ...

    @abstractmethod
    async def _dead_letters(self, count: int) -> list[DeadLetter]: ...

    @abstractmethod
    async def _ping(self) -> None: ...

    @abstractmethod
    async def _close(self) -> None: ...

    async def _prepare(self) -> None:  # noqa: B027 - optional hook, no-op default
        """Connect or initialise before the first operation, if the backend needs it."""

    async def _start_notifications(self) -> None:  # noqa: B027 - optional hook, no-op default
        """Start push notifications of state changes if the backend needs a listener."""

    def _notifications_active(self) -> bool:
        """Whether a state change is guaranteed to wake waiters right now."""
        return True


def _clip(reason: str) -> str:
    reason = reason.strip() or "no reason given"
    return reason if len(reason) <= MAX_REASON_CHARS else reason[: MAX_REASON_CHARS - 3] + "..."
