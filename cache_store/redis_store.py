"""The Redis backend: payloads as strings with TTL, key states in hashes, jobs on a stream.

Per prefix key `k` (one hash tag, so one Cluster slot):
  deliberate:{k}:payload  the safetensors bytes, PX payload_ttl
  deliberate:{k}:claim    the dedup claim taken by enqueue (SET NX PX pending_ttl)
  deliberate:{k}:state    hash: state (pending|ready|failed|declined), reason, attempts,
                          updated_at, value_delta/value_std_error/value_tokens (value check)
Shared: the stream `deliberate:jobs` read by the group `deliberate-workers`, the dead-letter
stream `deliberate:jobs:dead`, the pub/sub channel `deliberate:events` that wakes
waiters when a key becomes ready, failed or declined, and the value-check estimates
`deliberate:value:<coprocessor>:<tenant hash | all>` (hashes of n, total, total_sq).

Every Lua script touches the keys of one slot only (either one prefix's keys or the job
stream), so the same code runs on a single Redis, behind Sentinel and on a Cluster.
Acked entries are deleted from the stream, so its length is the number of outstanding jobs
and bounds the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rex

from cache_store.errors import MalformedJob
from cache_store.keys import (
    CONSUMER_GROUP,
    DEAD_LETTER_STREAM,
    EVENTS_CHANNEL,
    JOB_STREAM,
    claim_key,
    payload_key,
    state_key,
    validate_key,
)
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

log = logging.getLogger(__name__)

# An enqueue takes milliseconds between taking its claim and adding its job; a claim still
# unconfirmed after this long was left by an enqueue that died in between.
_UNCONFIRMED_CLAIM_S = 30.0

RedisClient = aioredis.Redis | aioredis.RedisCluster

# KEYS: payload, state, claim. ARGV: token, pending ttl ms, stale ms, tenant.
# The claim is the dedup: SET NX with expiry. Its value is "t:<token>:<redis ms>" until the
# job is on the stream, then "j:<entry id>". A "t:" claim older than stale ms belongs to an
# enqueue that died between its two steps (e.g. a timeout during an outage); it is taken
# over, and it expires after stale ms by itself (confirming it sets the pending TTL), so an
# outage cannot leave a key pending for the whole pending TTL even if no enqueue of the key
# comes again. Times come from Redis, so client clock skew cannot make fresh claims look
# stale.
_ENQUEUE_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 'ready' end
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'failed' or state == 'declined' then return state end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local value = 't:' .. ARGV[1] .. ':' .. now
local function owned()
  -- The tenant is recorded with the key, so status lookups can be scoped to it.
  redis.call('HSET', KEYS[2], 'tenant', ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return 'claimed'
end
if redis.call('SET', KEYS[3], value, 'NX', 'PX', ARGV[3]) then return owned() end
local held = redis.call('GET', KEYS[3]) or ''
local born = tonumber(string.match(held, '^t:%x+:(%d+)$'))
if born and now - born >= tonumber(ARGV[3]) then
  redis.call('SET', KEYS[3], value, 'PX', ARGV[3])
  return owned()
end
-- The claim and Redis's time, so the client can check that a "j:" claim's stream entry
-- still exists (the stream lives in another Cluster slot: not from this script).
return {'pending', held, now}
"""

# KEYS: claim, state. ARGV: the claim value seen. Releases a claim whose stream entry was
# found gone, unless the claim changed meanwhile.
_DROP_ORPHAN = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if redis.call('HGET', KEYS[2], 'state') == 'pending' then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: state. Clears a failed mark (dead letters requeued by an operator).
_CLEAR_FAILED = """
if redis.call('HGET', KEYS[1], 'state') == 'failed' then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: claim. ARGV: token, entry id, pending ttl ms. Marks the claim as backed by a stream
# entry, for the pending TTL.
_CONFIRM_CLAIM = """
if string.match(redis.call('GET', KEYS[1]) or '', '^t:(%x+):') == ARGV[1] then
  return redis.call('SET', KEYS[1], 'j:' .. ARGV[2], 'PX', ARGV[3])
end
return 0
"""

# KEYS: job stream. ARGV: max length, job json. The length check and the XADD are one step,
# so concurrent enqueues cannot overfill the stream.
_XADD_BOUNDED = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
return redis.call('XADD', KEYS[1], '*', 'job', ARGV[2])
"""

# KEYS: claim. ARGV: token. Deletes the claim only if this enqueue took it.
_DROP_CLAIM = """
if string.match(redis.call('GET', KEYS[1]) or '', '^t:(%x+):') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: payload, state, claim.
_STATUS = """
return {redis.call('EXISTS', KEYS[1]), redis.call('HGETALL', KEYS[2]),
        redis.call('EXISTS', KEYS[3])}
"""

# KEYS: payload. ARGV: sha1 of the bytes that were rejected.
_DISCARD = """
local v = redis.call('GET', KEYS[1])
if v and redis.sha1hex(v) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: payload, state, claim. ARGV: payload, ttl ms, attempts, now, tenant, then the
# value-check figure's fields as name, value pairs (none if it was not measured).
_PUBLISH = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'state', 'ready', 'attempts', ARGV[3], 'updated_at', ARGV[4],
           'tenant', ARGV[5])
for i = 6, #ARGV, 2 do redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[3])
return 1
"""

# KEYS: state, claim. ARGV: state (failed|declined), reason, attempts, ttl ms, now, tenant,
# then the value-check figure's fields as name, value pairs.
_MARK_FINISHED = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'reason', ARGV[2], 'attempts', ARGV[3],
           'updated_at', ARGV[5], 'tenant', ARGV[6])
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: state. ARGV: attempts, now, ttl ms, tenant. A stale redelivery must not hide a result.
_MARK_PENDING = """
local s = redis.call('HGET', KEYS[1], 'state')
if s == 'ready' or s == 'failed' or s == 'declined' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'pending', 'attempts', ARGV[1], 'updated_at', ARGV[2],
           'tenant', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""

# KEYS: state, claim. Drop a job without a result: the key is free to be enqueued again.
_UNCLAIM = """
if redis.call('HGET', KEYS[1], 'state') == 'pending' then redis.call('DEL', KEYS[1]) end
return redis.call('DEL', KEYS[2])
"""

# KEYS: stream. ARGV: group, id. Acked entries are deleted so XLEN counts outstanding jobs.
_ACK = """
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return n
"""

# KEYS: stream. ARGV: group, consumer, min idle ms, cursor, count. Reclaims idle entries and
# returns each with its delivery count, in one round trip.
_RECLAIM = """
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                     'COUNT', ARGV[5])
local out = {}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local count = 1
    if p[1] then count = p[1][4] end
    table.insert(out, {e[1], e[2], count})
  end
end
return {r[1], out}
"""

# KEYS: stream. ARGV: group, consumer, ids... Restarts the idle clock of the entries this
# consumer still holds (JUSTID: the delivery count is not incremented); an entry another
# consumer took over is left alone. Returns the ids renewed.
_RENEW = """
local out = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    local r = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    if r[1] then table.insert(out, ARGV[i]) end
  end
end
return out
"""

# KEYS: stream. ARGV: group, idle ms, consumer to keep. Deletes consumers with no pending
# entries idle that long; one script, so a consumer cannot claim a job between the check and
# the delete (DELCONSUMER would make its pending entries unclaimable).
_PRUNE_CONSUMERS = """
local ok, infos = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return {} end
local out = {}
for _, c in ipairs(infos) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[2])
     and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    table.insert(out, f['name'])
  end
end
return out
"""

# KEYS: stream. ARGV: group, id, consumer, idle ms, retry count. Hands an entry back: idle
# past the visibility timeout (next XAUTOCLAIM takes it) with its delivery count restored.
_RELEASE = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if not p[1] or p[1][2] ~= ARGV[3] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'IDLE', ARGV[4],
           'RETRYCOUNT', ARGV[5], 'JUSTID')
return 1
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(raw: Sequence[Any] | dict[Any, Any]) -> dict[str, bytes]:
    """Stream entry fields from a flat [k1, v1, ...] list (Lua) or a dict (redis-py)."""
    if isinstance(raw, dict):
        return {_text(k): v for k, v in raw.items()}
    return {_text(raw[i]): raw[i + 1] for i in range(0, len(raw), 2)}


class RedisStore(AugmentationStore):
    backend = "redis"
    _transient_errors = (
        rex.ConnectionError,
        rex.TimeoutError,
        rex.ClusterError,
        rex.TryAgainError,
        rex.ReadOnlyError,
        rex.OutOfMemoryError,
        rex.RedisClusterException,
        # Error replies: MISCONF, BUSY, OOM, NOPERM, READONLY, LOADING, ... The primitives
        # catch the replies they expect (NOGROUP, BUSYGROUP) before this; any other is the
        # server refusing the work, which for callers is the store being unavailable.
        rex.ResponseError,
        OSError,
    )
    _refusal_errors = (rex.ResponseError,)
    # redis-py strips the code from the replies it has a class for.
    _REPLY_CODES: tuple[tuple[type[BaseException], str], ...] = (
        (rex.OutOfMemoryError, "OOM"),
        (rex.NoPermissionError, "NOPERM"),
        (rex.ReadOnlyError, "READONLY"),
    )

    def _refusal_code(self, exc: BaseException) -> str:
        for cls, code in self._REPLY_CODES:
            if isinstance(exc, cls):
                return code
        return super()._refusal_code(exc)

    def __init__(self, client: RedisClient, config: StoreConfig, metrics: StoreMetrics) -> None:
        super().__init__(config, metrics)
        self._client = client
        self._scripts = {
            name: client.register_script(source)
            for name, source in {
                "enqueue_claim": _ENQUEUE_CLAIM,
                "confirm_claim": _CONFIRM_CLAIM,
                "xadd_bounded": _XADD_BOUNDED,
                "drop_claim": _DROP_CLAIM,
                "status": _STATUS,
                "discard": _DISCARD,
                "publish": _PUBLISH,
                "mark_finished": _MARK_FINISHED,
                "mark_pending": _MARK_PENDING,
                "unclaim": _UNCLAIM,
                "ack": _ACK,
                "reclaim": _RECLAIM,
                "release": _RELEASE,
                "renew": _RENEW,
                "prune_consumers": _PRUNE_CONSUMERS,
                "drop_orphan": _DROP_ORPHAN,
                "clear_failed": _CLEAR_FAILED,
            }.items()
        }
        self._group_ready = False
        self._initialized = not isinstance(client, aioredis.RedisCluster)
        self._init_lock = asyncio.Lock()
        self._reclaim_cursor = "0-0"
        self._listener: asyncio.Task[None] | None = None
        self._listening = False
        self.subscriptions = 0
        """Times the events listener has (re)subscribed: more than 1 means it reconnected."""

    async def _prepare(self) -> None:
        if self._initialized:
            return
        # redis-py's async cluster client can lose connections when many commands race
        # its lazy initialisation (AttributeError on a closed writer, seen with 50
        # concurrent enqueues on a fresh client); initialise once, before any command.
        async with self._init_lock:
            if not self._initialized:
                assert isinstance(self._client, aioredis.RedisCluster)
                await self._client.initialize()
                self._initialized = True

    async def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    # ------------------------------------------------------------------ payloads and states

    async def _get_payload_bytes(self, key: str) -> bytes | None:
        data = await self._client.get(payload_key(key))
        return None if data is None else bytes(data)

    async def _discard_payload(self, key: str, data: bytes) -> None:
        await self._run("discard", [payload_key(key)], [hashlib.sha1(data).hexdigest()])

    async def _status(self, key: str) -> KeyStatus:
        has_payload, raw_state, has_claim = await self._run(
            "status", [payload_key(key), state_key(key), claim_key(key)], []
        )
        state = {_text(k): _text(v) for k, v in _fields(raw_state).items()}
        attempts = int(state.get("attempts", 0))
        updated_at = float(state["updated_at"]) if "updated_at" in state else None
        value, tenant = _value_from_fields(state), state.get("tenant")
        if has_payload:
            return KeyStatus(KeyState.READY, None, attempts, updated_at, value=value, tenant=tenant)
        if state.get("state") in (KeyState.FAILED.value, KeyState.DECLINED.value):
            return KeyStatus(
                KeyState(state["state"]),
                state.get("reason"),
                attempts,
                updated_at,
                value=value,
                tenant=tenant,
            )
        if has_claim:
            pending = state.get("state") == KeyState.PENDING.value
            return KeyStatus(
                KeyState.PENDING,
                None,
                attempts if pending else 0,
                updated_at if pending else None,
                tenant=tenant,
            )
        return KeyStatus(KeyState.ABSENT)

    # ------------------------------------------------------------------ queue

    async def _enqueue(self, job: Job) -> EnqueueOutcome:
        claim = claim_key(job.key)
        token = uuid.uuid4().hex
        verdict = await self._enqueue_claim(job, token)
        if verdict == "orphaned":
            verdict = await self._enqueue_claim(job, token)  # the lost job's claim is gone
        if verdict != "claimed":
            return {
                "ready": EnqueueOutcome.ALREADY_READY,
                "failed": EnqueueOutcome.FAILED,
                "declined": EnqueueOutcome.DECLINED,
                "pending": EnqueueOutcome.ALREADY_PENDING,
                "orphaned": EnqueueOutcome.ALREADY_PENDING,  # released twice in a row: a race
            }[verdict]
        entry_id = await self._run(
            "xadd_bounded", [JOB_STREAM], [self.config.max_queue_length, job.to_json()]
        )
        if entry_id is None:
            await self._run("drop_claim", [claim], [token])
            return EnqueueOutcome.QUEUE_FULL
        await self._run(
            "confirm_claim", [claim], [token, _text(entry_id), _ms(self.config.pending_ttl_s)]
        )
        return EnqueueOutcome.ENQUEUED

    async def _enqueue_claim(self, job: Job, token: str) -> str:
        """Take the key's claim: claimed, ready, failed, declined, pending, or orphaned (a
        claim whose job was lost from the stream was found and released: try again)."""
        reply = await self._run(
            "enqueue_claim",
            [payload_key(job.key), state_key(job.key), claim_key(job.key)],
            [token, _ms(self.config.pending_ttl_s), _ms(_UNCONFIRMED_CLAIM_S), job.tenant],
        )
        if not isinstance(reply, list):
            return _text(reply)
        _, held, now_ms = reply
        if await self._release_orphan(job.key, _text(held), int(now_ms)):
            return "orphaned"
        return "pending"

    async def _release_orphan(self, key: str, held: str, now_ms: int) -> bool:
        """Release the claim `held` ("j:<entry id>") of `key` if it is older than the
        visibility timeout and its stream entry no longer exists (lost in a Cluster failover
        of the stream's shard, XTRIM, DEL): else the key would stay pending, refusing new
        jobs, until the claim's pending_ttl_s ran out. Only pending keys older than the
        visibility timeout pay the extra XRANGE round trip."""
        if not held.startswith("j:"):
            return False
        entry_id = held[2:]
        try:
            born_ms = int(entry_id.split("-", 1)[0])
        except ValueError:
            return False
        if now_ms - born_ms < _ms(self.config.visibility_timeout_s):
            return False
        if await self._client.xrange(JOB_STREAM, entry_id, entry_id, count=1):
            return False
        released = await self._run("drop_orphan", [claim_key(key), state_key(key)], [held])
        if released:
            self.metrics.orphaned_claims.inc()
            log.warning(
                "store: key %s was pending on stream entry %s, which no longer exists; its "
                "claim was released so the job can be enqueued again",
                key,
                entry_id,
            )
        return bool(released)

    async def _ensure_group(self, *, force: bool = False) -> None:
        if self._group_ready and not force:
            return
        try:
            # From id 0, so jobs enqueued before any worker started are read too.
            await self._client.xgroup_create(JOB_STREAM, CONSUMER_GROUP, id="0", mkstream=True)
        except rex.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _claim_jobs(self, consumer: str, max_jobs: int, block_s: float) -> list[Delivery]:
        await self._ensure_group()
        try:
            return await self._claim_once(consumer, max_jobs, block_s)
        except rex.ResponseError as exc:
            # The stream or group vanished (Redis restarted without persistence, or was
            # flushed): recreate the group and read again.
            if "NOGROUP" not in str(exc):
                raise
            log.warning("store: consumer group %s was missing; recreating it", CONSUMER_GROUP)
            await self._ensure_group(force=True)
            return await self._claim_once(consumer, max_jobs, block_s)

    async def _claim_once(self, consumer: str, max_jobs: int, block_s: float) -> list[Delivery]:
        raw: list[tuple[str, dict[str, bytes], int]] = []
        cursor, reclaimed = await self._run(
            "reclaim",
            [JOB_STREAM],
            [CONSUMER_GROUP, consumer, _ms(self.config.visibility_timeout_s), self._reclaim_cursor,
             max_jobs],
        )  # fmt: skip
        self._reclaim_cursor = _text(cursor)
        for entry_id, fields, count in reclaimed:
            raw.append((_text(entry_id), _fields(fields), int(count)))
        self.metrics.reclaimed.inc(sum(1 for entry in raw if entry[2] > 1))
        if len(raw) < max_jobs:
            block_ms = _ms(block_s) if not raw and block_s > 0 else None
            response = await self._client.xreadgroup(
                CONSUMER_GROUP,
                consumer,
                {JOB_STREAM: ">"},
                count=max_jobs - len(raw),
                block=block_ms,
            )
            for _stream, entries in response or []:
                for entry_id, fields in entries:
                    if fields:
                        raw.append((_text(entry_id), _fields(fields), 1))
        deliveries: list[Delivery] = []
        for entry_id, fields, count in raw:
            delivery = await self._admit(consumer, entry_id, fields, count)
            if delivery is not None:
                deliveries.append(delivery)
        await asyncio.gather(
            *(
                self._run(
                    "mark_pending",
                    [state_key(d.job.key)],
                    [d.deliveries, repr(time.time()), _ms(self.config.pending_ttl_s), d.job.tenant],
                )
                for d in deliveries
            )
        )
        return deliveries

    async def _admit(
        self, consumer: str, entry_id: str, fields: dict[str, bytes], count: int
    ) -> Delivery | None:
        """A delivery for the worker, or None if the entry was dead-lettered instead."""
        job_json = fields.get("job", b"")
        try:
            job = Job.from_json(job_json)
        except MalformedJob as exc:
            await self._bury(entry_id, None, str(exc), count, _text(job_json), consumer)
            return None
        delivery = Delivery(job, entry_id, count, consumer)
        if count > self.config.max_deliveries:
            await self._dead_letter(
                delivery,
                f"gave up after {count - 1} deliveries without a result "
                "(worker crashed or timed out each time)",
            )
            return None
        return delivery

    async def _bury(
        self,
        entry_id: str,
        key: str | None,
        reason: str,
        deliveries: int,
        job_json: str,
        consumer: str,
    ) -> None:
        """Copy an entry to the dead-letter stream and remove it from the job stream."""
        await self._client.xadd(
            DEAD_LETTER_STREAM,
            {
                "job": job_json,
                "key": key or "",
                "reason": reason,
                "deliveries": deliveries,
                "consumer": consumer,
                "source_id": entry_id,
                "failed_at": repr(time.time()),
            },
            maxlen=self.config.max_dead_letters,
            approximate=True,
        )
        await self._run("ack", [JOB_STREAM], [CONSUMER_GROUP, entry_id])
        self.metrics.dead_lettered.inc()

    async def _announce(self, key: str, state: str) -> None:
        await self._client.publish(EVENTS_CHANNEL, json.dumps({"key": key, "state": state}))

    async def _publish(
        self, delivery: Delivery, payload_bytes: bytes, value: ValueFigure | None
    ) -> None:
        key = delivery.job.key
        await self._run(
            "publish",
            [payload_key(key), state_key(key), claim_key(key)],
            [
                payload_bytes,
                _ms(self.config.payload_ttl_s),
                delivery.deliveries,
                repr(time.time()),
                delivery.job.tenant,
                *_value_fields(value),
            ],
        )
        # The payload is stored before the ack: a crash in between only causes a harmless
        # redelivery, never an acked job without a payload.
        await self._run("ack", [JOB_STREAM], [CONSUMER_GROUP, delivery.stream_id])
        await self._announce(key, KeyState.READY.value)

    async def _mark_finished(
        self,
        delivery: Delivery,
        state: KeyState,
        reason: str,
        ttl_s: float,
        value: ValueFigure | None = None,
    ) -> None:
        """Mark a job's key failed or declined (with expiry) and drop its claim."""
        key = delivery.job.key
        await self._run(
            "mark_finished",
            [state_key(key), claim_key(key)],
            [state.value, reason, delivery.deliveries, _ms(ttl_s), repr(time.time()),
             delivery.job.tenant, *_value_fields(value)],
        )  # fmt: skip

    async def _decline(self, delivery: Delivery, reason: str, value: ValueFigure) -> None:
        key = delivery.job.key
        await self._mark_finished(
            delivery, KeyState.DECLINED, reason, self.config.declined_ttl_s, value
        )
        await self._run("ack", [JOB_STREAM], [CONSUMER_GROUP, delivery.stream_id])
        await self._announce(key, KeyState.DECLINED.value)

    async def _add_value(self, key: str, delta: float) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.hincrby(key, "n", 1)
        pipe.hincrbyfloat(key, "total", delta)
        pipe.hincrbyfloat(key, "total_sq", delta * delta)
        await pipe.execute()

    async def _read_value(self, key: str) -> ValueEstimate:
        fields = {_text(k): _text(v) for k, v in (await self._client.hgetall(key)).items()}
        return ValueEstimate(
            int(fields.get("n", 0)),
            float(fields.get("total", 0.0)),
            float(fields.get("total_sq", 0.0)),
        )

    async def _dead_letter(self, delivery: Delivery, reason: str) -> None:
        key = delivery.job.key
        await self._mark_finished(delivery, KeyState.FAILED, reason, self.config.failed_ttl_s)
        await self._bury(
            delivery.stream_id, key, reason, delivery.deliveries, delivery.job.to_json(),
            delivery.consumer,
        )  # fmt: skip
        await self._announce(key, KeyState.FAILED.value)

    async def _release(self, delivery: Delivery) -> None:
        await self._run(
            "release",
            [JOB_STREAM],
            [CONSUMER_GROUP, delivery.stream_id, delivery.consumer,
             _ms(self.config.visibility_timeout_s) + 1, max(0, delivery.deliveries - 1)],
        )  # fmt: skip

    async def _renew(self, deliveries: list[Delivery]) -> set[str]:
        ids = [d.stream_id for d in deliveries]
        renewed = await self._run(
            "renew", [JOB_STREAM], [CONSUMER_GROUP, deliveries[0].consumer, *ids]
        )
        return {_text(entry_id) for entry_id in renewed}

    async def _clear_failed(self, key: str) -> None:
        await self._run("clear_failed", [state_key(key)], [])

    async def _drop_dead_letter(self, stream_id: str) -> None:
        await self._client.xdel(DEAD_LETTER_STREAM, stream_id)

    async def _prune_consumers(self, idle_s: float, keep: str | None) -> list[str]:
        removed = await self._run(
            "prune_consumers", [JOB_STREAM], [CONSUMER_GROUP, _ms(idle_s), keep or ""]
        )
        return [_text(name) for name in removed]

    async def _ack(self, delivery: Delivery) -> None:
        key = delivery.job.key
        await self._run("ack", [JOB_STREAM], [CONSUMER_GROUP, delivery.stream_id])
        await self._run("unclaim", [state_key(key), claim_key(key)], [])
        await self._announce(key, KeyState.ABSENT.value)

    async def _queue_stats(self) -> QueueStats:
        length = await self._client.xlen(JOB_STREAM)
        dead = await self._client.xlen(DEAD_LETTER_STREAM)
        pending = 0
        if length:
            try:
                summary = await self._client.xpending(JOB_STREAM, CONSUMER_GROUP)
                pending = int(summary["pending"])
            except rex.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
        oldest_age = None
        first = await self._client.xrange(JOB_STREAM, count=1)
        if first:
            millis = int(_text(first[0][0]).split("-")[0])
            oldest_age = max(0.0, time.time() - millis / 1000)
        return QueueStats(
            length=length, pending=pending, oldest_age_s=oldest_age, dead_letters=dead
        )

    async def _dead_letters(self, count: int) -> list[DeadLetter]:
        entries = await self._client.xrevrange(DEAD_LETTER_STREAM, count=count)
        letters: list[DeadLetter] = []
        for entry_id, raw in entries:
            fields = {k: _text(v) for k, v in _fields(raw).items()}
            letters.append(
                DeadLetter(
                    stream_id=_text(entry_id),
                    key=fields.get("key") or None,
                    reason=fields.get("reason", ""),
                    deliveries=int(fields.get("deliveries", 0)),
                    job_json=fields.get("job", ""),
                    failed_at=float(fields.get("failed_at", 0.0)),
                )
            )
        return letters

    async def _ping(self) -> None:
        await self._client.ping()

    # ------------------------------------------------------------------ notifications

    async def _start_notifications(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="deliberate-store-events")

    def _notifications_active(self) -> bool:
        return self._listening

    async def _listen(self) -> None:
        """Follow the events channel for as long as the store is open, reconnecting with
        backoff. While disconnected, waiters fall back to polling."""
        backoff = 0.05
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                async with asyncio.timeout(self.config.op_timeout_s):
                    await pubsub.subscribe(EVENTS_CHANNEL)
                self._listening = True
                self.subscriptions += 1
                backoff = 0.05
                # redis-py reconnects and resubscribes a pub/sub connection by itself; hear
                # about it, since events published during the gap were lost.
                connection = getattr(pubsub, "connection", None)
                if connection is not None:
                    connection.register_connect_callback(self._on_events_reconnect)
                # Events published while we were not subscribed are lost: re-check all.
                self._notify_all()
                await self._follow(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("store: events listener disconnected: %s", exc)
            finally:
                self._listening = False
                self._notify_all()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), self.config.op_timeout_s)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _follow(self, pubsub: Any) -> None:
        """Read events until the store closes. Health check: after events_health_check_s
        without traffic, PING; no answer within op_timeout_s means the connection is dead
        or hung (a frozen Redis keeps the socket open), so raise and reconnect, while
        waiters fall back to polling."""
        loop = asyncio.get_running_loop()
        interval = self.config.events_health_check_s
        heard = loop.time()
        pinged: float | None = None
        while not self._closed:
            wait = min(1.0, interval)
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
            now = loop.time()
            if message is not None:
                heard, pinged = now, None
                if message.get("type") == "message":
                    self._on_event(message["data"])
                continue
            if pinged is not None and now - pinged > self.config.op_timeout_s:
                raise rex.ConnectionError(
                    f"events connection: no answer to PING in {self.config.op_timeout_s} s"
                )
            if pinged is None and now - heard >= interval:
                async with asyncio.timeout(self.config.op_timeout_s):
                    await pubsub.ping()
                pinged = now

    def _on_events_reconnect(self, _connection: object) -> None:
        self.subscriptions += 1
        self._notify_all()

    def _on_event(self, data: bytes | str) -> None:
        try:
            key = validate_key(json.loads(data)["key"])
        except (ValueError, KeyError, TypeError):
            return  # not ours; the channel is public to anything that can reach Redis
        self._notify(key)

    async def _close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._listener
        self._notify_all()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.aclose(), self.config.op_timeout_s)


def _value_fields(value: ValueFigure | None) -> list[str]:
    """A value-check figure as flat hash fields for the Lua scripts (none if not measured)."""
    if value is None:
        return []
    return ["value_delta", repr(value.delta), "value_std_error", repr(value.std_error),
            "value_tokens", str(value.tokens)]  # fmt: skip


def _value_from_fields(state: dict[str, str]) -> ValueFigure | None:
    if "value_delta" not in state:
        return None
    return ValueFigure(
        float(state["value_delta"]),
        float(state.get("value_std_error", 0.0)),
        int(state.get("value_tokens", 0)),
    )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
