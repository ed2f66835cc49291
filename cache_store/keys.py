"""Prefix keys and the Redis key names derived from them (DESIGN §3).

A prefix key is a SHA-256 over the format version, both fingerprints, the tenant and the
prefix token ids packed as fixed-width little-endian uint32. Text never enters the hash
(two tokenizations of one text are different prefixes to the decoder), and neither does a
length alone (vLLM issues 42119 and 53495: equal-length embedding prompts shared stale KV).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence

FORMAT_VERSION: int = 1
"""Bumped whenever the key derivation or the payload layout changes: old payloads then miss."""

KEY_NAMESPACE = "deliberate"
JOB_STREAM = "deliberate:jobs"
CONSUMER_GROUP = "deliberate-workers"
DEAD_LETTER_STREAM = "deliberate:jobs:dead"
EVENTS_CHANNEL = "deliberate:events"

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_DOMAIN = b"deliberate-prefix-key\0"
_UINT32_MAX = 0xFFFFFFFF


def _put_field(digest: hashlib._Hash, name: str, value: str) -> None:
    if not value:
        raise ValueError(f"prefix_key: {name} is empty; pass the real {name}")
    raw = value.encode("utf-8")
    # Length-prefixed so that ("ab", "c") and ("a", "bc") can never hash alike.
    digest.update(struct.pack("<I", len(raw)))
    digest.update(raw)


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian uint32, the fixed-width form that is hashed into keys."""
    try:
        return struct.pack(f"<{len(token_ids)}I", *token_ids)
    except struct.error as exc:
        bad = next((t for t in token_ids if not 0 <= int(t) <= _UINT32_MAX), None)
        raise ValueError(
            f"token ids must be integers in [0, 2**32): got {bad!r}; pass tokenizer ids, "
            "not text or embeddings"
        ) from exc


def prefix_key(
    *, decoder_fp: str, coprocessor_fp: str, tenant: str, token_ids: Sequence[int]
) -> str:
    """The 64-hex-digit key of one reusable prefix for one decoder/coprocessor pair."""
    if len(token_ids) == 0:
        raise ValueError("prefix_key: token_ids is empty; an empty prefix has nothing to augment")
    digest = hashlib.sha256(_DOMAIN)
    digest.update(struct.pack("<I", FORMAT_VERSION))
    _put_field(digest, "decoder_fp", decoder_fp)
    _put_field(digest, "coprocessor_fp", coprocessor_fp)
    _put_field(digest, "tenant", tenant)
    digest.update(struct.pack("<Q", len(token_ids)))
    digest.update(pack_token_ids(token_ids))
    return digest.hexdigest()


def validate_key(key: str) -> str:
    """Return `key` if it has the prefix_key() form, else raise: keys end up in Redis key
    names, so anything else (braces, colons) could address another prefix's slot."""
    if not isinstance(key, str) or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"not a prefix key: {key!r}; expected 64 lowercase hex digits from prefix_key()"
        )
    return key


def _tagged(key: str, suffix: str) -> str:
    # The {hash tag} keeps every key of one prefix on one Redis Cluster slot, so the
    # per-prefix Lua scripts touch a single slot.
    return f"{KEY_NAMESPACE}:{{{validate_key(key)}}}:{suffix}"


def payload_key(key: str) -> str:
    return _tagged(key, "payload")


def state_key(key: str) -> str:
    return _tagged(key, "state")


def claim_key(key: str) -> str:
    return _tagged(key, "claim")


def value_key(coprocessor_fp: str, tenant: str | None) -> str:
    """The running value-check estimate of one coprocessor, for one tenant or (None) for all.
    The tenant is hashed: it is client-influenced text and must not shape Redis key names."""
    scope = "all" if tenant is None else hashlib.sha256(tenant.encode()).hexdigest()[:32]
    fp = hashlib.sha256(coprocessor_fp.encode()).hexdigest()[:32]
    return f"{KEY_NAMESPACE}:value:{fp}:{scope}"
