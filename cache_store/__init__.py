"""cache_store: the contract between the server and the coprocessor workers (DESIGN §3).

Fingerprints, prefix keys, the payload format, key states and the job queue, with two
backends behind one asyncio interface: Redis (redis://, rediss://, Sentinel, Cluster) and
in-memory (the embedded default). It imports nothing else of the project.

    store = open_store(settings.redis_url, payload_ttl_s=..., ...)
    outcome = await store.enqueue(Job.create(tenant=..., decoder_fp=..., coprocessor_fp=...,
                                             token_ids=ids))
"""

from cache_store.errors import (
    MalformedJob,
    PayloadRejected,
    PayloadTooLarge,
    StoreError,
    StoreUnavailable,
)
from cache_store.factory import open_store, redact
from cache_store.fingerprint import checkpoint_fingerprint, decoder_fingerprint
from cache_store.keys import (
    CONSUMER_GROUP,
    DEAD_LETTER_STREAM,
    FORMAT_VERSION,
    JOB_STREAM,
    prefix_key,
)
from cache_store.metrics import StoreMetrics
from cache_store.payload import Payload, PayloadExpectation, decode_payload, encode_payload
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

__all__ = [
    "CONSUMER_GROUP",
    "DEAD_LETTER_STREAM",
    "FORMAT_VERSION",
    "JOB_STREAM",
    "AugmentationStore",
    "DeadLetter",
    "Delivery",
    "EnqueueOutcome",
    "Job",
    "KeyState",
    "KeyStatus",
    "MalformedJob",
    "Payload",
    "PayloadExpectation",
    "PayloadRejected",
    "PayloadTooLarge",
    "QueueStats",
    "StoreConfig",
    "StoreError",
    "StoreMetrics",
    "StoreUnavailable",
    "checkpoint_fingerprint",
    "decode_payload",
    "decoder_fingerprint",
    "encode_payload",
    "open_store",
    "prefix_key",
    "redact",
]
