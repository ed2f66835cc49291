"""Value types shared by both backends: key states, jobs, deliveries, settings."""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

from cache_store.errors import MalformedJob
from cache_store.keys import prefix_key, validate_key
from cache_store.value import ValueFigure

JOB_SCHEMA_VERSION = 1


class KeyState(enum.StrEnum):
    ABSENT = "absent"
    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"
    DECLINED = "declined"
    """The value check found the latents confidently harmful for this context."""


@dataclass(frozen=True, slots=True)
class KeyStatus:
    state: KeyState
    reason: str | None = None
    """Why the key failed or was declined (FAILED, DECLINED)."""
    attempts: int = 0
    """Deliveries of the key's job so far (0 until a worker has claimed it)."""
    updated_at: float | None = None
    """Unix time of the last state change a worker recorded, if any."""
    value: ValueFigure | None = None
    """The value check's figure of the key's latents (READY, DECLINED), if measured."""
    tenant: str | None = None
    """The tenant whose job the key belongs to, as recorded by enqueue, claim, publish,
    fail and decline (None when absent, or recorded by a version that did not record it)."""

    @property
    def terminal(self) -> bool:
        """Waiting longer cannot change the answer without a new enqueue."""
        return self.state is not KeyState.PENDING


class EnqueueOutcome(enum.StrEnum):
    ENQUEUED = "enqueued"
    ALREADY_PENDING = "already_pending"
    ALREADY_READY = "already_ready"
    QUEUE_FULL = "queue_full"
    FAILED = "failed"
    """The key is marked failed (recently dead-lettered); it is retried after failed_ttl_s."""
    DECLINED = "declined"
    """The key's latents were declined by the value check; retried after declined_ttl_s."""


@dataclass(frozen=True, slots=True)
class Job:
    """One request to compute the latents of one prefix. JSON on the wire, never pickle."""

    key: str
    tenant: str
    decoder_fp: str
    coprocessor_fp: str
    token_ids: list[int]
    enqueued_at: float = field(default_factory=time.time)

    @classmethod
    def create(
        cls, *, tenant: str, decoder_fp: str, coprocessor_fp: str, token_ids: list[int]
    ) -> Job:
        """A job whose key is derived here, so key and token ids cannot disagree."""
        key = prefix_key(
            decoder_fp=decoder_fp, coprocessor_fp=coprocessor_fp, tenant=tenant, token_ids=token_ids
        )
        return cls(key, tenant, decoder_fp, coprocessor_fp, [int(t) for t in token_ids])

    @property
    def prefix_len(self) -> int:
        return len(self.token_ids)

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": JOB_SCHEMA_VERSION,
                "key": self.key,
                "tenant": self.tenant,
                "decoder_fp": self.decoder_fp,
                "coprocessor_fp": self.coprocessor_fp,
                "token_ids": self.token_ids,
                "enqueued_at": self.enqueued_at,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Job:
        """Parse and check a job; the key must be the hash of the job's own fields, so a
        corrupted or forged entry cannot publish latents under another prefix's key."""
        try:
            data: Any = json.loads(text)
            if not isinstance(data, dict):
                raise ValueError(f"a job is a JSON object, not {type(data).__name__}")
            if data.get("v") != JOB_SCHEMA_VERSION:
                raise ValueError(f"unsupported job schema {data.get('v')!r}")
            token_ids = data["token_ids"]
            if not isinstance(token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in token_ids
            ):
                raise ValueError("token_ids is not a list of integers")
            job = cls(
                key=validate_key(data["key"]),
                tenant=str(data["tenant"]),
                decoder_fp=str(data["decoder_fp"]),
                coprocessor_fp=str(data["coprocessor_fp"]),
                token_ids=token_ids,
                enqueued_at=float(data["enqueued_at"]),
            )
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            # OverflowError: an enqueued_at past float's range; RecursionError: JSON nested
            # deeper than the parser's recursion limit.
            detail = str(exc)[:200]
            raise MalformedJob(f"job entry is not a valid Deliberate job: {detail}") from exc
        job.verify()
        return job

    def verify(self) -> None:
        """Raise MalformedJob unless `key` is the prefix key of this job's own fields."""
        try:
            validate_key(self.key)
            expected = prefix_key(
                decoder_fp=self.decoder_fp,
                coprocessor_fp=self.coprocessor_fp,
                tenant=self.tenant,
                token_ids=self.token_ids,
            )
        except (ValueError, TypeError) as exc:
            raise MalformedJob(f"job entry is not a valid Deliberate job: {exc}") from exc
        if expected != self.key:
            raise MalformedJob(
                f"job key {self.key} is not the hash of its own fields ({expected}); "
                "build jobs with Job.create()"
            )


@dataclass(frozen=True, slots=True)
class Delivery:
    """A job in a worker's hands. Hand it back with publish, fail, release or ack."""

    job: Job
    stream_id: str
    deliveries: int
    """How many times this entry has been delivered, this one included (1 = first)."""
    consumer: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stream_id: str
    key: str | None
    reason: str
    deliveries: int
    job_json: str
    failed_at: float


@dataclass(frozen=True, slots=True)
class QueueStats:
    length: int
    """Outstanding jobs: waiting plus in a worker's hands (acked entries are deleted)."""
    pending: int
    """Delivered and not yet acknowledged."""
    oldest_age_s: float | None
    """Age of the oldest outstanding job, None when the queue is empty."""
    dead_letters: int

    @property
    def waiting(self) -> int:
        return max(0, self.length - self.pending)


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """Limits and lifetimes shared by both backends. Defaults mirror deliberate.settings."""

    payload_ttl_s: float = 7 * 24 * 3600.0
    max_queue_length: int = 10_000
    visibility_timeout_s: float = 120.0
    max_deliveries: int = 3
    max_payload_bytes: int = 4 << 20
    op_timeout_s: float = 1.0
    pending_ttl_s: float = 6 * 3600.0
    """Lifetime of the dedup claim: bounds how long a lost job can keep its key pending."""
    failed_ttl_s: float = 3600.0
    """How long a dead-lettered key refuses new jobs before it may be tried again."""
    declined_ttl_s: float = 24 * 3600.0
    """How long a declined key refuses new jobs before it may be measured again."""
    max_dead_letters: int = 10_000
    poll_interval_s: float = 0.25
    """wait_ready's re-check interval while push notifications are not available."""
    memory_capacity_bytes: int = 1 << 30
    """In-memory backend only: least recently used payloads are evicted past this total."""
    breaker_failures: int = 5
    """Consecutive failed operations that open the circuit breaker; 0: no breaker."""
    breaker_cooldown_s: float = 1.0
    """How long an open breaker skips the backend before one probe call may try it."""
    events_health_check_s: float = 5.0
    """Redis: PING the events (pub/sub) connection after this long without traffic; no
    answer within op_timeout_s means the connection is dead or hung and is replaced."""

    def __post_init__(self) -> None:
        positive = {
            "payload_ttl_s": self.payload_ttl_s,
            "max_queue_length": self.max_queue_length,
            "visibility_timeout_s": self.visibility_timeout_s,
            "max_deliveries": self.max_deliveries,
            "max_payload_bytes": self.max_payload_bytes,
            "op_timeout_s": self.op_timeout_s,
            "pending_ttl_s": self.pending_ttl_s,
            "failed_ttl_s": self.failed_ttl_s,
            "declined_ttl_s": self.declined_ttl_s,
            "max_dead_letters": self.max_dead_letters,
            "poll_interval_s": self.poll_interval_s,
            "memory_capacity_bytes": self.memory_capacity_bytes,
            "breaker_cooldown_s": self.breaker_cooldown_s,
            "events_health_check_s": self.events_health_check_s,
        }
        bad = {name: value for name, value in positive.items() if not value > 0}
        if bad:
            raise ValueError(f"store settings must be positive, got {bad}")
