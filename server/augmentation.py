"""Deciding, per request, whether the decoder sees latents (DESIGN §4.3-4.7).

The request path never waits on the store for more than a few milliseconds: a lookup that is
slow or fails is answered plainly and counted. On a hit the prompt becomes
`embed(context) ++ latents ++ embed(rest)`; on a miss it stays token ids and a job is queued.
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
from cache_store.payload import PayloadExpectation
from cache_store.store import AugmentationStore
from cache_store.types import EnqueueOutcome, Job, KeyState, KeyStatus
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


_ENQUEUE_STATUS = {
    EnqueueOutcome.ENQUEUED: AugmentationStatus.MISS_ENQUEUED,
    EnqueueOutcome.ALREADY_PENDING: AugmentationStatus.MISS_ENQUEUED,
    # Became ready between our lookup and the enqueue: the next request will hit.
    EnqueueOutcome.ALREADY_READY: AugmentationStatus.MISS_ENQUEUED,
    EnqueueOutcome.QUEUE_FULL: AugmentationStatus.MISS_QUEUE_FULL,
    EnqueueOutcome.FAILED: AugmentationStatus.MISS_FAILED,
}


@dataclass(frozen=True)
class Plan:
    """What to send to vLLM, and what to tell the client about it."""

    prompt: dict[str, Any]
    status: AugmentationStatus
    key: str | None
    n_latents: int
    prompt_tokens: int

    def describe(self) -> dict[str, Any]:
        return {"status": self.status.value, "key": self.key, "n_latents": self.n_latents}


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
        metrics: ServerMetrics,
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
        self.use_latents = coprocessor.gate_passed or allow_unvalidated
        self.metrics = metrics

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

        def plain(status: AugmentationStatus, key: str | None = None) -> Plan:
            return Plan({"prompt_token_ids": plain_ids}, status, key, 0, len(plain_ids))

        if not context_ids:
            return plain(AugmentationStatus.NO_CONTEXT)
        if not augment:
            return plain(AugmentationStatus.DISABLED)
        if len(context_ids) < self.min_context_tokens:
            return plain(AugmentationStatus.TOO_SHORT)
        if not self.use_latents:
            return plain(AugmentationStatus.SKIPPED_UNVALIDATED)

        job = self.job_for(context_ids, tenant)
        try:
            latents = await self._lookup(job)
            if latents is None:
                outcome = await self._bounded(
                    self.store.enqueue(job, timeout_s=self.lookup_timeout_s), "enqueue"
                )
                if wait_s > 0 and outcome in (
                    EnqueueOutcome.ENQUEUED,
                    EnqueueOutcome.ALREADY_PENDING,
                    EnqueueOutcome.ALREADY_READY,
                ):
                    latents = await self._wait_and_fetch(job, min(wait_s, self.max_wait_s))
                if latents is None:
                    return plain(_ENQUEUE_STATUS[outcome], job.key)
        except (StoreError, TimeoutError):
            # The store turns every backend failure (outage, hang, error reply, open circuit
            # breaker) into a StoreError. Counted as
            # deliberate_requests_total{status="store-unavailable"}.
            return plain(AugmentationStatus.STORE_UNAVAILABLE, job.key)

        prompt_embeds = torch.cat(
            [self.embeddings.embed(context_ids), latents, self.embeddings.embed(rest_ids)]
        )
        return Plan(
            {"prompt_embeds": prompt_embeds},
            AugmentationStatus.HIT,
            job.key,
            self.n_latents,
            len(plain_ids),
        )

    async def _bounded(self, call: Any, op: str) -> Any:
        """A store call on the request path: a few milliseconds, or treated as unavailable.
        The store bounds the call itself (timeout_s), so that it counts the timeout and
        its circuit breaker sees it; this outer bound is only a backstop."""
        started = time.perf_counter()
        try:
            return await asyncio.wait_for(call, 2 * self.lookup_timeout_s + 0.05)
        finally:
            self.metrics.store_lookup_seconds.labels(op=op).observe(time.perf_counter() - started)

    async def _lookup(self, job: Job) -> torch.Tensor | None:
        payload = await self._bounded(
            self.store.get_payload(job.key, self.expectation(job), timeout_s=self.lookup_timeout_s),
            "get",
        )
        return None if payload is None else payload.latents.to(self.embeddings.weight.dtype)

    async def _wait_and_fetch(self, job: Job, wait_s: float) -> torch.Tensor | None:
        status = await self.store.wait_ready(job.key, wait_s)
        if status.state is not KeyState.READY:
            return None
        return await self._lookup(job)

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
        )

    async def prewarm(self, context_ids: list[int], tenant: str | None) -> tuple[Job, str]:
        """Queue a context's augmentation ahead of traffic; returns the job and its outcome
        (an EnqueueOutcome value, or "too-short" for a context requests would not augment)."""
        job = self.job_for(context_ids, tenant)
        if len(context_ids) < self.min_context_tokens:
            return job, AugmentationStatus.TOO_SHORT.value
        outcome = await self.store.enqueue(job)
        return job, outcome.value

    async def status(self, key: str) -> KeyStatus:
        return await self.store.status(key)
