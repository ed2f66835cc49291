"""Issue 13 items 8 and 9 on real parts: the worker loop with the real SmolLM2 coprocessor
on a real redis-server. The only stand-ins are thin wrappers around the real model that
inject the fault under test (NaN latents or an out-of-memory error for one prefix, a slow
batch); everything they do not inject is the real computation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry

from cache_store import AugmentationStore, EnqueueOutcome, Job, KeyState, PayloadExpectation
from cache_store import open_store as _open_store
from cache_store.value import ValueFigure
from coprocessor_worker.coprocessor import Coprocessor, ValueCheck
from coprocessor_worker.worker import AugmentationWorker, WorkerLimits, WorkerMetrics
from tests.fixtures.redis_server import RedisServer

N_LATENTS = 4  # the fixture checkpoint's
HIDDEN = 576
MAX_MODEL_LEN = 512
VOCAB = 49152


@pytest.fixture(scope="module")
def coprocessor(bundled_decoder: Path, coprocessor_checkpoint: Path) -> Coprocessor:
    torch.set_num_threads(1)  # a shared 2-core machine
    return Coprocessor.load(
        coprocessor_checkpoint, bundled_decoder, dtype=torch.float32, compute_dtype=torch.float32
    )


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


class Faulty:
    """The real coprocessor, serialized (peft's adapter switch is process-wide state, so two
    in-process workers must not run it at once), with faults injected for chosen prefixes."""

    _lock = threading.Lock()

    def __init__(
        self,
        real: Coprocessor,
        *,
        nan_for: Sequence[Sequence[int]] = (),
        oom_for: Sequence[Sequence[int]] = (),
        delay_s: float = 0.0,
    ) -> None:
        self.real = real
        self.fingerprint = real.fingerprint
        self.decoder_fingerprint = real.decoder_fingerprint
        self.nan_for = {tuple(p) for p in nan_for}
        self.oom_for = {tuple(p) for p in oom_for}
        self.delay_s = delay_s
        self.batches: list[int] = []
        """Size of every batch the worker asked for."""

    @property
    def n_latents(self) -> int:
        return self.real.n_latents

    def latents_with_value(
        self, prefixes: Sequence[Sequence[int]], check: ValueCheck
    ) -> list[tuple[torch.Tensor, ValueFigure | None]]:
        self.batches.append(len(prefixes))
        time.sleep(self.delay_s)
        if any(tuple(p) in self.oom_for for p in prefixes):
            # What torch raises when one long prefix does not fit next to the others.
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        with self._lock:
            results = self.real.latents_with_value(prefixes, check)
        return [
            (torch.full_like(t, float("nan")), f) if tuple(p) in self.nan_for else (t, f)
            for p, (t, f) in zip(prefixes, results, strict=True)
        ]


def open_store(url: str, **config: float) -> AugmentationStore:
    return _open_store(url, registry=CollectorRegistry(), op_timeout_s=5.0, **config)


def make_worker(
    store: AugmentationStore,
    model: object,
    consumer: str,
    *,
    payload_secret: bytes | None = None,
    **limits: float,
) -> AugmentationWorker:
    options = {"max_jobs": 8, "max_tokens": 4096, "block_s": 0.2} | limits
    return AugmentationWorker(
        store,
        model,  # type: ignore[arg-type]
        consumer=consumer,
        limits=WorkerLimits(
            max_prefix_tokens=MAX_MODEL_LEN - N_LATENTS, vocab_size=VOCAB, **options
        ),  # type: ignore[arg-type]
        metrics=WorkerMetrics(CollectorRegistry()),
        payload_secret=payload_secret,
    )


def jobs(coprocessor: Coprocessor, lengths: Sequence[int], seed: int) -> list[Job]:
    rng = random.Random(seed)
    return [
        Job.create(
            tenant="tenant-r",
            decoder_fp=coprocessor.decoder_fingerprint,
            coprocessor_fp=coprocessor.fingerprint,
            token_ids=[rng.randrange(3, VOCAB) for _ in range(n)],
        )
        for n in lengths
    ]


def expectation(job: Job) -> PayloadExpectation:
    return PayloadExpectation.for_job(job, n_latents=N_LATENTS, hidden=HIDDEN, dtype=torch.bfloat16)


async def settle(store: AugmentationStore, keys: Sequence[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for key in keys:
        status = await store.wait_ready(key, max(0.1, deadline - time.monotonic()))
        assert status.terminal, f"{key} still {status} after {timeout_s} s"


async def test_a_poison_job_in_a_mixed_batch_is_the_only_one_dead_lettered(
    coprocessor: Coprocessor, redis: RedisServer
) -> None:
    # Short visibility timeout and 2 deliveries: without isolation the innocent jobs of the
    # batch are abandoned with the poison, reclaimed, and dead-lettered within seconds.
    store = open_store(redis.url, visibility_timeout_s=1.0, max_deliveries=2)
    # The two poisons are the shortest prefixes, so they lead the length-sorted batch.
    nan_job, oom_job, *good = jobs(coprocessor, (9, 10, 24, 30, 36, 48), seed=11)
    model = Faulty(coprocessor, nan_for=[nan_job.token_ids], oom_for=[oom_job.token_ids])
    worker = make_worker(store, model, "isolating")
    for job in (nan_job, oom_job, *good):  # all queued first, so they share one claim
        assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await settle(store, [j.key for j in (nan_job, oom_job, *good)], timeout_s=90)
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
    try:
        for job in good:
            status = await store.status(job.key)
            assert status.state is KeyState.READY and status.attempts == 1, status
            payload = await store.get_payload(job.key, expectation(job))
            assert payload is not None
            reference = coprocessor.latents([job.token_ids])[0].to(torch.bfloat16)
            torch.testing.assert_close(payload.latents.float(), reference.float(),
                                       atol=2e-2, rtol=2e-2)  # fmt: skip
        letters = {letter.key: letter for letter in await store.dead_letters()}
        assert set(letters) == {nan_job.key, oom_job.key}
        # Each named with its own error, at its first delivery.
        assert "NaN" in letters[nan_job.key].reason
        assert "OutOfMemoryError" in letters[oom_job.key].reason
        assert "out of memory" in letters[oom_job.key].reason
        assert {letter.deliveries for letter in letters.values()} == {1}
        for job in (nan_job, oom_job):
            assert (await store.status(job.key)).state is KeyState.FAILED
        assert worker.outcomes["done"] == len(good) and worker.outcomes["failed"] == 2
        assert worker.outcomes["error"] == 0
        # One batch of 6, then halves (3 and 3 after the compute error), and so on, down to
        # the two poisons alone: a few more passes, not a recompute per job of the claim.
        assert model.batches[0] == 6 and model.batches.count(1) >= 2
        assert len(model.batches) <= 9, model.batches
        stats = await store.queue_stats()
        assert (stats.length, stats.pending) == (0, 0)
    finally:
        await store.close()


async def test_a_slow_batch_keeps_its_claim_and_the_rest_goes_to_other_workers(
    coprocessor: Coprocessor, redis: RedisServer
) -> None:
    visibility = 1.5
    slow_store = open_store(redis.url, visibility_timeout_s=visibility)
    fast_store = open_store(redis.url, visibility_timeout_s=visibility)

    def sample(store: AugmentationStore, name: str) -> float:
        return store.metrics.registry.get_sample_value(name) or 0.0

    # Each of the slow worker's batches takes 4 s, well past the 1.5 s visibility timeout;
    # once it computes, another worker polls the queue every 0.2 s.
    slow_model = Faulty(coprocessor, delay_s=4.0)
    fast = make_worker(fast_store, Faulty(coprocessor), "poller")

    async def slow_step_with_a_poller(slow: AugmentationWorker, keys: list[str]) -> int:
        computing = len(slow_model.batches)
        step = asyncio.create_task(slow.step())
        while len(slow_model.batches) == computing:  # the slow worker holds its claim
            assert not step.done(), "the slow worker claimed nothing"
            await asyncio.sleep(0.02)
        stop = asyncio.Event()
        polling = asyncio.create_task(fast.run(stop))
        try:
            claimed = await step
            await settle(slow_store, keys, timeout_s=60)
        finally:
            stop.set()
            await asyncio.wait_for(polling, 60)
        return claimed

    try:
        # 1. One slow job alone: its claim is renewed, so the poller never reclaims it.
        (alone,) = jobs(coprocessor, (16,), seed=13)
        assert await slow_store.enqueue(alone) is EnqueueOutcome.ENQUEUED
        lone = make_worker(slow_store, slow_model, "slow-alone", max_jobs=1)
        assert await slow_step_with_a_poller(lone, [alone.key]) == 1
        status = await slow_store.status(alone.key)
        assert sample(fast_store, "deliberate_store_reclaimed_total") == 0
        assert fast.outcomes["done"] == 0, "the poller took over a job still being computed"
        assert status.state is KeyState.READY and status.attempts == 1, status
        assert sample(slow_store, "deliberate_store_renewed_total") >= 2  # one per 0.5 s

        # 2. A claim of four whose token budget fits one per batch: the slow worker keeps
        # one and hands the other three back at once, to the poller.
        lengths = (16, 18, 20, 22)
        batch = jobs(coprocessor, lengths, seed=12)
        for job in batch:
            assert await slow_store.enqueue(job) is EnqueueOutcome.ENQUEUED
        slow = make_worker(slow_store, slow_model, "slow", max_jobs=4, max_tokens=max(lengths))
        assert await slow_step_with_a_poller(slow, [j.key for j in batch]) == 4
        for store in (slow_store, fast_store):
            assert sample(store, "deliberate_store_reclaimed_total") == 0
        for job in batch:
            status = await slow_store.status(job.key)
            # Never reclaimed: every job was delivered exactly once.
            assert status.state is KeyState.READY and status.attempts == 1, (job.key, status)
        assert slow.outcomes["done"] == 1 and slow.outcomes["released"] == 3
        # The three that did not fit the slow batch went to the other worker at once.
        assert fast.outcomes["done"] == 3
        assert await slow_store.dead_letters() == []
    finally:
        await slow_store.close()
        await fast_store.close()


async def test_workers_remove_dead_consumers_from_the_group(
    coprocessor: Coprocessor, redis: RedisServer
) -> None:
    import redis as redis_sync

    from cache_store import CONSUMER_GROUP, JOB_STREAM

    store = open_store(redis.url)
    (job,) = jobs(coprocessor, (12,), seed=14)
    try:
        # A worker that held a job, finished it and went away; and one that died holding one.
        await store.enqueue(job)
        [delivery] = await store.claim_jobs("gone-idle", block_s=0.5)
        await store.release(delivery)
        assert await store.claim_jobs("gone-holding", block_s=0.5) != []
        assert await store.claim_jobs("gone-idle", block_s=0.0) == []
        worker = make_worker(store, Faulty(coprocessor, delay_s=30), "alive",
                             dead_consumer_s=0.5, prune_interval_s=0.2)  # fmt: skip
        await asyncio.sleep(0.6)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        client = redis_sync.Redis.from_url(redis.url)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                names = {c["name"].decode() for c in
                         client.xinfo_consumers(JOB_STREAM, CONSUMER_GROUP)}  # fmt: skip
                if "gone-idle" not in names:
                    break
                await asyncio.sleep(0.1)
            # Removed: the idle one that held nothing. Kept: the one holding a job (its
            # entry would become unclaimable). The live worker has not been delivered
            # anything, so Redis has not made it a consumer yet.
            assert names == {"gone-holding"}, names
        finally:
            stop.set()
            await asyncio.wait_for(task, 60)
            client.close()
        removed = store.metrics.registry.get_sample_value(
            "deliberate_store_consumers_removed_total"
        )
        assert removed == 1
    finally:
        await store.close()


async def test_a_worker_with_the_payload_secret_signs_what_it_publishes(
    coprocessor: Coprocessor, redis: RedisServer
) -> None:
    secret = b"payload-secret-for-tests-0123"
    store = open_store(redis.url)
    try:
        [job] = jobs(coprocessor, [40], seed=5)
        assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
        assert await make_worker(store, coprocessor, "signer", payload_secret=secret).step() == 1
        signed = dataclasses.replace(expectation(job), secret=secret)
        payload = await store.get_payload(job.key, signed)
        assert payload is not None
        forged = dataclasses.replace(signed, secret=b"not-the-secret-0123456789")
        assert await store.get_payload(job.key, forged) is None
    finally:
        await store.close()
