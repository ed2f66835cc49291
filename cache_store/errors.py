"""Typed errors of the store. Callers branch on the type, operators read the message."""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the store raises on purpose."""


class StoreUnavailable(StoreError):
    """The backend did not answer within the operation timeout, or refused the connection.

    Raised fast (within `op_timeout_s`), never after a hang. The store reconnects by itself
    on the next call once the backend is back; the server answers plainly meanwhile.
    """

    def __init__(self, op: str, backend: str, cause: BaseException | str) -> None:
        self.op = op
        self.backend = backend
        super().__init__(
            f"store operation {op!r} on {backend} failed: {cause}. "
            "Check that Redis is running and reachable at the configured URL; "
            "calls recover on their own once it answers again."
        )


class StoreRefused(StoreUnavailable):
    """The backend answered, but with an error reply instead of doing the work: Redis's
    MISCONF (cannot persist), BUSY (a script runs), OOM (maxmemory), NOPERM (ACL), READONLY
    (a replica), LOADING, and any other error reply. `code` is the reply's first word.

    A StoreUnavailable like any other: the request path answers plainly, the augmentation
    endpoints answer 503. Operators read the code in the log and in the message.
    """

    def __init__(self, op: str, backend: str, code: str, cause: BaseException | str) -> None:
        self.code = code
        super().__init__(op, backend, f"error reply {code}: {cause}")


class CircuitOpen(StoreUnavailable):
    """Skipped without calling the backend: it failed several times in a row and the store
    waits out a cool-down before it tries again (counted in
    deliberate_store_breaker_skipped_total)."""

    def __init__(self, op: str, backend: str, retry_in_s: float) -> None:
        super().__init__(
            op, backend, f"circuit open after repeated failures; retry in {retry_in_s:.2f} s"
        )


class PayloadRejected(StoreError):
    """A payload failed verification. `reason` is a short label (used as a metric label)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"payload rejected ({reason}): {detail}")


class PayloadTooLarge(PayloadRejected):
    """A worker tried to publish more bytes than `max_payload_bytes` allows."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            "too_large",
            f"{size} bytes is over max_payload_bytes={limit}; publish fewer latents or raise "
            "the limit (DELIBERATE_MAX_PAYLOAD_BYTES)",
        )


class MalformedJob(StoreError):
    """A job entry could not be parsed or does not match its own key."""
