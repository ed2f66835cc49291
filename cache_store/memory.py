"""The in-memory backend: the embedded default (one process, no Redis).

Same semantics as the Redis backend, modelled on Redis Streams: a bounded queue of entries,
deliveries counted per entry, reclaim of entries idle past the visibility timeout, dead
letters past max_deliveries, payload TTL, and a dedup claim with expiry. It lives on one
event loop (the server's, with the worker loop as a task on it); it is not thread-safe and
need not be: every method runs to completion between awaits.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from cache_store.keys import DEAD_LETTER_STREAM
from cache_store.metrics import StoreMetrics
from cache_store.store import AugmentationStore
from cache_store.types import (
    DeadLetter,
    Delivery,
    EnqueueOutcome,
    Job,
    KeyState,
    KeyStatus,
    QueueStats,
    StoreConfig,
)
from cache_store.value import ValueEstimate, ValueFigure

V = TypeVar("V")


class _ExpiringMap(Generic[V]):
    """A dict whose entries vanish at their expiry time, in least-recently-used order."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[V, float]] = OrderedDict()
        self._expiries: list[tuple[float, str]] = []

    def get(self, key: str, now: float, *, touch: bool = False) -> V | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._items[key]
            return None
        if touch:
            self._items.move_to_end(key)
        return item[0]

    def set(self, key: str, value: V, expires_at: float) -> None:
        self._items[key] = (value, expires_at)
        self._items.move_to_end(key)
        heapq.heappush(self._expiries, (expires_at, key))

    def pop(self, key: str) -> V | None:
        item = self._items.pop(key, None)
        return None if item is None else item[0]

    def pop_oldest(self) -> tuple[str, V] | None:
        if not self._items:
            return None
        key, (value, _) = self._items.popitem(last=False)
        return key, value

    def sweep(self, now: float) -> list[V]:
        """Drop expired entries; return their values (for size accounting)."""
        dropped: list[V] = []
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, key = heapq.heappop(self._expiries)
            item = self._items.get(key)
            # A key set again later has a newer expiry; its old heap record is stale.
            if item is not None and item[1] == expires_at:
                del self._items[key]
                dropped.append(item[0])
        if len(self._expiries) > 4 * len(self._items) + 64:
            self._expiries = [(exp, k) for k, (_, exp) in self._items.items()]
            heapq.heapify(self._expiries)
        return dropped

    def __len__(self) -> int:
        return len(self._items)


@dataclass(slots=True)
class _Stored:
    data: bytes
    attempts: int
    updated_at: float
    value: ValueFigure | None = None
    tenant: str | None = None


@dataclass(slots=True)
class _Record:
    """State of a key that is pending (claimed by a worker), failed or declined."""

    state: KeyState
    reason: str | None
    attempts: int
    updated_at: float
    value: ValueFigure | None = None
    tenant: str | None = None


@dataclass(slots=True)
class _Entry:
    stream_id: str
    job: Job
    created_at: float
    consumer: str | None = None
    delivered_at: float = 0.0
    deliveries: int = 0
    released: bool = False


class MemoryStore(AugmentationStore):
    backend = "memory"

    def __init__(self, config: StoreConfig, metrics: StoreMetrics) -> None:
        super().__init__(config, metrics)
        self._payloads: _ExpiringMap[_Stored] = _ExpiringMap()
        self._payload_bytes = 0
        self._claims: _ExpiringMap[str] = _ExpiringMap()
        self._records: _ExpiringMap[_Record] = _ExpiringMap()
        self._entries: dict[str, _Entry] = {}
        # Entries in a worker's hands, oldest delivery first: reclaim scans only these, so a
        # long queue does not make every claim_jobs call walk all of it.
        self._in_hand: dict[str, _Entry] = {}
        self._undelivered: deque[str] = deque()
        self._dead: deque[DeadLetter] = deque(maxlen=config.max_dead_letters)
        self._last_id = (0, 0)
        self._jobs_available = asyncio.Event()
        self._values: dict[str, ValueEstimate] = {}
        self._consumers: dict[str, float] = {}
        """Consumer name -> monotonic time of its last claim (Redis's consumer idle time)."""

    # ------------------------------------------------------------------ payloads and states

    async def _get_payload_bytes(self, key: str) -> bytes | None:
        stored = self._payloads.get(key, time.monotonic(), touch=True)
        return None if stored is None else stored.data

    async def _discard_payload(self, key: str, data: bytes) -> None:
        stored = self._payloads.get(key, time.monotonic())
        if stored is not None and stored.data == data:
            self._payloads.pop(key)
            self._payload_bytes -= len(data)

    def _status_now(self, key: str) -> KeyStatus:
        now = time.monotonic()
        stored = self._payloads.get(key, now)
        if stored is not None:
            return KeyStatus(
                KeyState.READY,
                attempts=stored.attempts,
                updated_at=stored.updated_at,
                value=stored.value,
                tenant=stored.tenant,
            )
        record = self._records.get(key, now)
        if record is not None and record.state in (KeyState.FAILED, KeyState.DECLINED):
            return KeyStatus(
                record.state,
                record.reason,
                record.attempts,
                record.updated_at,
                value=record.value,
                tenant=record.tenant,
            )
        stream_id = self._claims.get(key, now)
        if stream_id is not None:
            attempts = record.attempts if record is not None else 0
            updated = record.updated_at if record is not None else None
            entry = self._entries.get(stream_id)
            tenant = entry.job.tenant if entry is not None else None
            return KeyStatus(KeyState.PENDING, None, attempts, updated, tenant=tenant)
        return KeyStatus(KeyState.ABSENT)

    async def _status(self, key: str) -> KeyStatus:
        return self._status_now(key)

    def _write_payload(self, key: str, stored: _Stored) -> None:
        now = time.monotonic()
        for dropped in self._payloads.sweep(now):
            self._payload_bytes -= len(dropped.data)
        previous = self._payloads.pop(key)
        if previous is not None:
            self._payload_bytes -= len(previous.data)
        self._payloads.set(key, stored, now + self.config.payload_ttl_s)
        self._payload_bytes += len(stored.data)
        # Like Redis with maxmemory-policy allkeys-lru: the embedded store must not grow
        # without bound in the serving process.
        while self._payload_bytes > self.config.memory_capacity_bytes and len(self._payloads) > 1:
            oldest = self._payloads.pop_oldest()
            if oldest is None:
                break
            self._payload_bytes -= len(oldest[1].data)

    # ------------------------------------------------------------------ queue

    def _next_id(self) -> str:
        ms = int(time.time() * 1000)
        last_ms, last_seq = self._last_id
        self._last_id = (ms, 0) if ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"

    async def _enqueue(self, job: Job) -> EnqueueOutcome:
        status = self._status_now(job.key)
        if status.state is KeyState.READY:
            return EnqueueOutcome.ALREADY_READY
        if status.state is KeyState.FAILED:
            return EnqueueOutcome.FAILED
        if status.state is KeyState.DECLINED:
            return EnqueueOutcome.DECLINED
        if status.state is KeyState.PENDING:
            return EnqueueOutcome.ALREADY_PENDING
        if len(self._entries) >= self.config.max_queue_length:
            return EnqueueOutcome.QUEUE_FULL
        now = time.monotonic()
        self._claims.sweep(now)
        self._records.sweep(now)
        stream_id = self._next_id()
        self._claims.set(job.key, stream_id, now + self.config.pending_ttl_s)
        self._entries[stream_id] = _Entry(stream_id, job, time.time())
        self._undelivered.append(stream_id)
        self._jobs_available.set()
        return EnqueueOutcome.ENQUEUED

    def _take(self, consumer: str, max_jobs: int) -> list[Delivery]:
        """Reclaimed entries first (oldest first), then new ones; dead-letter the worn out."""
        now = time.monotonic()
        self._consumers[consumer] = now
        taken: list[_Entry] = []
        for entry in self._in_hand.values():
            if len(taken) >= max_jobs:
                break
            if now - entry.delivered_at >= self.config.visibility_timeout_s:
                taken.append(entry)
                if not entry.released:
                    self.metrics.reclaimed.inc()
        while self._undelivered and len(taken) < max_jobs:
            entry = self._entries.get(self._undelivered.popleft())
            if entry is not None:
                taken.append(entry)
        if not self._undelivered:
            self._jobs_available.clear()
        deliveries: list[Delivery] = []
        for entry in taken:
            entry.consumer, entry.delivered_at = consumer, now
            entry.deliveries += 1
            entry.released = False
            self._in_hand.pop(entry.stream_id, None)
            self._in_hand[entry.stream_id] = entry
            delivery = Delivery(entry.job, entry.stream_id, entry.deliveries, consumer)
            if entry.deliveries > self.config.max_deliveries:
                self._dead_letter_now(
                    delivery,
                    f"gave up after {entry.deliveries - 1} deliveries without a result "
                    "(worker crashed or timed out each time)",
                )
                continue
            self._records.set(
                entry.job.key,
                _Record(
                    KeyState.PENDING,
                    None,
                    entry.deliveries,
                    time.time(),
                    tenant=entry.job.tenant,
                ),
                now + self.config.pending_ttl_s,
            )
            deliveries.append(delivery)
        return deliveries

    async def _claim_jobs(self, consumer: str, max_jobs: int, block_s: float) -> list[Delivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + block_s
        while True:
            deliveries = self._take(consumer, max_jobs)
            remaining = deadline - loop.time()
            if deliveries or remaining <= 0:
                return deliveries
            try:
                async with asyncio.timeout(remaining):
                    await self._jobs_available.wait()
            except TimeoutError:
                return self._take(consumer, max_jobs)

    def _remove_entry(self, stream_id: str) -> None:
        self._entries.pop(stream_id, None)
        self._in_hand.pop(stream_id, None)
        # An undelivered id left in the deque is skipped by _take once its entry is gone.

    async def _publish(
        self, delivery: Delivery, payload_bytes: bytes, value: ValueFigure | None
    ) -> None:
        key = delivery.job.key
        stored = _Stored(
            payload_bytes, delivery.deliveries, time.time(), value, delivery.job.tenant
        )
        self._write_payload(key, stored)
        self._records.pop(key)
        self._claims.pop(key)
        self._remove_entry(delivery.stream_id)
        self._notify(key)

    async def _decline(self, delivery: Delivery, reason: str, value: ValueFigure) -> None:
        key = delivery.job.key
        self._records.set(
            key,
            _Record(
                KeyState.DECLINED,
                reason,
                delivery.deliveries,
                time.time(),
                value,
                delivery.job.tenant,
            ),
            time.monotonic() + self.config.declined_ttl_s,
        )
        self._claims.pop(key)
        self._remove_entry(delivery.stream_id)
        self._notify(key)

    async def _add_value(self, key: str, delta: float) -> None:
        self._values[key] = self._values.get(key, ValueEstimate()).add(delta)

    async def _read_value(self, key: str) -> ValueEstimate:
        return self._values.get(key, ValueEstimate())

    def _dead_letter_now(self, delivery: Delivery, reason: str) -> None:
        key = delivery.job.key
        now = time.time()
        self._dead.appendleft(
            DeadLetter(
                stream_id=f"{DEAD_LETTER_STREAM}/{delivery.stream_id}",
                key=key,
                reason=reason,
                deliveries=delivery.deliveries,
                job_json=delivery.job.to_json(),
                failed_at=now,
            )
        )
        self._records.set(
            key,
            _Record(KeyState.FAILED, reason, delivery.deliveries, now, tenant=delivery.job.tenant),
            time.monotonic() + self.config.failed_ttl_s,
        )
        self._claims.pop(key)
        self._remove_entry(delivery.stream_id)
        self.metrics.dead_lettered.inc()
        self._notify(key)

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        self._dead_letter_now(delivery, reason)

    async def _release(self, delivery: Delivery) -> None:
        entry = self._entries.get(delivery.stream_id)
        if entry is None or entry.consumer != delivery.consumer:
            return  # already finished, or reclaimed by another consumer meanwhile
        # Make it idle past the visibility timeout, and give back the delivery it used.
        entry.delivered_at = float("-inf")
        entry.deliveries = max(0, entry.deliveries - 1)
        entry.released = True
        self._jobs_available.set()

    async def _renew(self, deliveries: list[Delivery]) -> set[str]:
        now = time.monotonic()
        renewed: set[str] = set()
        for delivery in deliveries:
            entry = self._in_hand.get(delivery.stream_id)
            if entry is None or entry.consumer != delivery.consumer or entry.released:
                continue  # finished, taken over by another consumer, or handed back
            entry.delivered_at = now
            # _in_hand stays ordered by delivery time, oldest first.
            self._in_hand[delivery.stream_id] = self._in_hand.pop(delivery.stream_id)
            renewed.add(delivery.stream_id)
        return renewed

    async def _clear_failed(self, key: str) -> None:
        record = self._records.get(key, time.monotonic())
        if record is not None and record.state is KeyState.FAILED:
            self._records.pop(key)

    async def _drop_dead_letter(self, stream_id: str) -> None:
        kept = [letter for letter in self._dead if letter.stream_id != stream_id]
        self._dead.clear()
        self._dead.extend(kept)

    async def _prune_consumers(self, idle_s: float, keep: str | None) -> list[str]:
        now = time.monotonic()
        busy = {entry.consumer for entry in self._in_hand.values()}
        removed = [
            name
            for name, seen in self._consumers.items()
            if name != keep and name not in busy and now - seen >= idle_s
        ]
        for name in removed:
            del self._consumers[name]
        return removed

    async def _ack(self, delivery: Delivery) -> None:
        self._remove_entry(delivery.stream_id)
        self._claims.pop(delivery.job.key)
        record = self._records.get(delivery.job.key, time.monotonic())
        if record is not None and record.state is KeyState.PENDING:
            self._records.pop(delivery.job.key)
        self._notify(delivery.job.key)

    async def _queue_stats(self) -> QueueStats:
        pending = len(self._in_hand)
        oldest = next(iter(self._entries.values()), None)
        return QueueStats(
            length=len(self._entries),
            pending=pending,
            oldest_age_s=None if oldest is None else max(0.0, time.time() - oldest.created_at),
            dead_letters=len(self._dead),
        )

    async def _dead_letters(self, count: int) -> list[DeadLetter]:
        return list(self._dead)[:count]

    async def _ping(self) -> None:
        return None

    async def _close(self) -> None:
        self._notify_all()
        self._jobs_available.set()  # blocked claim_jobs calls return at once
