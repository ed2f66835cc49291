"""Deciding, per request, whether the decoder sees latents (docs/architecture.md).

The request path never waits on the store for more than a few milliseconds: a lookup that is
slow or fails is answered plainly and counted. On a hit the prompt becomes
`embed(context) ++ latents ++ embed(rest)` (or, for a checkpoint whose latents replace the
context's tail, `embed(context[:-N_L]) ++ latents ++ embed(rest)`), unless the value check
declines them (the tenant's running estimate does not show them harmless yet, or this
context's own figure is confidently harmful): then, as on a miss, it stays token ids.
Misses queue a job either way, so the evidence the value check needs keeps coming in.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass
from typing import Any

import torch

from cache_store.checkpoint import CheckpointInfo
from cache_store.errors import StoreError
from cache_store.payload import Payload, PayloadExpectation
from cache_store.store import AugmentationStore
from cache_store.types import EnqueueOutcome, Job, KeyState, KeyStatus
from cache_store.value import ValuePolicy, Verdict, confidently_harmful, verdict
from server.embeddings import EmbeddingTable
from server.metrics import ServerMetrics


class AugmentationStatus(enum.StrEnum):
    HIT = "hit"
    MISS_ENQUEUED = "miss-enqueued"
    MISS_QUEUE_FULL = "miss-queue-full"
    MISS_FAILED = "miss-failed"
    DISABLED = "disabled"
    NO_CONTEXT = "no-context"
    TOO_SHORT = "too-short"
    STORE_UNAVAILABLE = "store-unavailable"
    SKIPPED_UNVALIDATED = "skipped-unvalidated"
    DECLINED = "declined"


_ENQUEUE_STATUS = {
    EnqueueOutcome.ENQUEUED: AugmentationStatus.MISS_ENQUEUED,
    EnqueueOutcome.ALREADY_PENDING: AugmentationStatus.MISS_ENQUEUED,
    # Became ready between our lookup and the enqueue: the next request will hit.
    EnqueueOutcome.ALREADY_READY: AugmentationStatus.MISS_ENQUEUED,
    EnqueueOutcome.QUEUE_FULL: AugmentationStatus.MISS_QUEUE_FULL,
    EnqueueOutcome.FAILED: AugmentationStatus.MISS_FAILED,
    EnqueueOutcome.DECLINED: AugmentationStatus.DECLINED,
}


_MAX_CACHED_VERDICTS = 4096


@dataclass(frozen=True)
class Plan:
    """What to send to vLLM, and what to tell the client about it."""

    prompt: dict[str, Any]
    status: AugmentationStatus
    key: str | None
    n_latents: int
    prompt_tokens: int
    reason: str | None = None
    """Why latents were declined (status declined)."""
    added_positions: int = 0
    """Positions the latents add to the plain prompt (none when they replace its tail)."""

    def describe(self) -> dict[str, Any]:
        described = {"status": self.status.value, "key": self.key, "n_latents": self.n_latents}
        return described | ({"reason": self.reason} if self.reason else {})


class Augmenter:
    """Owns the request-side half of the contract: keys, lookups, enqueues, prompt assembly."""

    def __init__(
        self,
        *,
        store: AugmentationStore,
        embeddings: EmbeddingTable,
        decoder_fp: str,
        coprocessor: CheckpointInfo,
        default_tenant: str,
        min_context_tokens: int,
        lookup_timeout_s: float,
        max_wait_s: float,
        allow_unvalidated: bool,
        value_policy: ValuePolicy,
        value_refresh_s: float,
        metrics: ServerMetrics,
        payload_secret: bytes | None = None,
    ) -> None:
        coprocessor.require_decoder(decoder_fp)
        if coprocessor.hidden_size != embeddings.hidden_size:
            raise ValueError(
                f"coprocessor hidden size {coprocessor.hidden_size} != decoder's "
                f"{embeddings.hidden_size}"
            )
        self.store = store
        self.embeddings = embeddings
        self.decoder_fp = decoder_fp
        self.coprocessor = coprocessor
        self.default_tenant = default_tenant
        self.min_context_tokens = min_context_tokens
        self.lookup_timeout_s = lookup_timeout_s
        self.max_wait_s = max_wait_s
        self.use_latents = coprocessor.gate(value_policy.enabled) or allow_unvalidated
        self.value_policy = value_policy
        self.value_refresh_s = value_refresh_s
        self._verdicts: dict[str, tuple[float, Verdict]] = {}
        self.metrics = metrics
        self.payload_secret = payload_secret
        """With it, only payloads signed by a worker holding it are served."""

    @property
    def n_latents(self) -> int:
        return self.coprocessor.n_latents

    def job_for(self, context_ids: list[int], tenant: str | None) -> Job:
        return Job.create(
            tenant=tenant or self.default_tenant,
            decoder_fp=self.decoder_fp,
            coprocessor_fp=self.coprocessor.fingerprint,
            token_ids=context_ids,
        )

    async def plan(
        self,
        context_ids: list[int],
        rest_ids: list[int],
        *,
        tenant: str | None,
        augment: bool,
        wait_s: float,
    ) -> Plan:
        plain_ids = context_ids + rest_ids

        def plain(
            status: AugmentationStatus, key: str | None = None, reason: str | None = None
        ) -> Plan:
            return Plan({"prompt_token_ids": plain_ids}, status, key, 0, len(plain_ids), reason)

        if not context_ids:
            return plain(AugmentationStatus.NO_CONTEXT)
        if not augment:
            return plain(AugmentationStatus.DISABLED)
        if self._too_short(context_ids):
            return plain(AugmentationStatus.TOO_SHORT)
        if not self.use_latents:
            return plain(AugmentationStatus.SKIPPED_UNVALIDATED)

        job = self.job_for(context_ids, tenant)
        try:
            payload = await self._lookup(job)
            if payload is None:
                outcome = await self._bounded(
                    self.store.enqueue(job, timeout_s=self.lookup_timeout_s), "enqueue"
                )
                if wait_s > 0 and outcome in (
                    EnqueueOutcome.ENQUEUED,
                    EnqueueOutcome.ALREADY_PENDING,
                    EnqueueOutcome.ALREADY_READY,
                ):
                    waited = await self.store.wait_ready(job.key, min(wait_s, self.max_wait_s))
                    if waited.state is KeyState.READY:
                        payload = await self._lookup(job)
                    elif waited.state is KeyState.DECLINED:
                        return plain(AugmentationStatus.DECLINED, job.key, waited.reason)
                if payload is None:
                    return plain(_ENQUEUE_STATUS[outcome], job.key)
            refusal = await self._value_refusal(job, payload)
        except (StoreError, TimeoutError):
            # The store turns every backend failure (outage, hang, error reply, open circuit
            # breaker) into a StoreError. Counted as
            # deliberate_requests_total{status="store-unavailable"}.
            return plain(AugmentationStatus.STORE_UNAVAILABLE, job.key)
        if refusal is not None:
            return plain(AugmentationStatus.DECLINED, job.key, refusal)
        latents = payload.latents.to(self.embeddings.weight.dtype)

        # Inserted after the context, or standing in for its last tokens' embeddings.
        kept = context_ids[: len(context_ids) - self.coprocessor.replaced_tokens]
        prompt_embeds = torch.cat(
            [self.embeddings.embed(kept), latents, self.embeddings.embed(rest_ids)]
        )
        return Plan(
            {"prompt_embeds": prompt_embeds},
            AugmentationStatus.HIT,
            job.key,
            self.n_latents,
            len(plain_ids),
            added_positions=self.coprocessor.added_positions,
        )

    def _too_short(self, context_ids: list[int]) -> bool:
        """Below the configured minimum, or no longer than the tail the latents replace."""
        return len(context_ids) < max(self.min_context_tokens, self.coprocessor.shortest_context)

    async def _bounded(self, call: Any, op: str) -> Any:
        """A store call on the request path: a few milliseconds, or treated as unavailable.
        The store bounds the call itself (timeout_s), so that it counts the timeout and
        its circuit breaker sees it; this outer bound is only a backstop."""
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(call, 2 * self.lookup_timeout_s + 0.05)
        finally:
            self.metrics.store_lookup_seconds.labels(op=op).observe(time.perf_counter() - started)

    async def _lookup(self, job: Job) -> Payload | None:
        return await self._bounded(
            self.store.get_payload(job.key, self.expectation(job), timeout_s=self.lookup_timeout_s),
            "get",
        )

    async def _value_refusal(self, job: Job, payload: Payload) -> str | None:
        """Why these latents must not be served (the value check, cache_store.value), or
        None. A tenant's verdict is re-read from the store at most every value_refresh_s."""
        if not self.value_policy.enabled:
            return None
        if confidently_harmful(payload.value, self.value_policy):
            return "the value check found these latents confidently harmful on this context"
        now = time.monotonic()
        cached = self._verdicts.get(job.tenant)
        if cached is None or cached[0] <= now:
            tenant_est, overall = await self._bounded(
                self.store.value_estimates(
                    job.coprocessor_fp, job.tenant, timeout_s=self.lookup_timeout_s
                ),
                "value",
            )
            cached = (now + self.value_refresh_s, verdict(tenant_est, overall, self.value_policy))
            if len(self._verdicts) >= _MAX_CACHED_VERDICTS:  # tenants may be many
                self._verdicts = {t: v for t, v in self._verdicts.items() if v[0] > now}
            self._verdicts[job.tenant] = cached
        return None if cached[1].serve else cached[1].reason

    def expectation(self, job: Job) -> PayloadExpectation:
        return PayloadExpectation(
            key=job.key,
            decoder_fp=self.decoder_fp,
            coprocessor_fp=self.coprocessor.fingerprint,
            prefix_len=job.prefix_len,
            n_latents=self.n_latents,
            hidden=self.embeddings.hidden_size,
            dtype=None,
            # Checked by the store, so a rejection is a miss, counted in
            # deliberate_store_payload_rejected_total{reason} and the payload discarded.
            cast_to=self.embeddings.weight.dtype,
            max_latent_norm=self.coprocessor.latent_norm_max,
            secret=self.payload_secret,
        )

    async def prewarm(self, context_ids: list[int], tenant: str | None) -> tuple[Job, str]:
        """Queue a context's augmentation ahead of traffic; returns the job and its outcome
        (an EnqueueOutcome value, or "too-short" for a context requests would not augment)."""
        job = self.job_for(context_ids, tenant)
        if self._too_short(context_ids):
            return job, AugmentationStatus.TOO_SHORT.value
        outcome = await self.store.enqueue(job)
        return job, outcome.value

    async def status(self, key: str) -> KeyStatus:
        return await self.store.status(key)
