"""The store contract, run against both backends (in-memory and a real redis-server).

Each test states one promise the server or the workers rely on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import torch

from cache_store import (
    EnqueueOutcome,
    Job,
    KeyState,
    MalformedJob,
    PayloadRejected,
    PayloadTooLarge,
)
from cache_store.value import ValueFigure
from tests.fixtures.store_backends import (
    COPROCESSOR_FP,
    N_LATENTS,
    StoreHarness,
    expectation,
    make_job,
    make_latents,
    make_payload,
    sample,
)


async def test_publish_then_get_returns_verified_latents(harness: StoreHarness) -> None:
    store = harness.open()
    job = make_job(1)
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
    assert (await store.status(job.key)).state is KeyState.PENDING

    [delivery] = await store.claim_jobs("worker-1", max_jobs=4, block_s=0.5)
    assert delivery.job == job
    assert delivery.deliveries == 1
    assert (await store.status(job.key)).attempts == 1

    await store.publish(delivery, make_payload(job, seed=3))
    status = await store.status(job.key)
    assert status.state is KeyState.READY and status.attempts == 1

    payload = await store.get_payload(job.key, expectation(job))
    assert payload is not None
    assert torch.equal(payload.latents, make_latents(3).to(torch.bfloat16))
    assert (payload.n_latents, payload.prefix_len) == (N_LATENTS, job.prefix_len)
    assert sample(store, "deliberate_store_hits_total") == 1
    assert await store.enqueue(job) is EnqueueOutcome.ALREADY_READY
    stats = await store.queue_stats()
    assert (stats.length, stats.pending) == (0, 0)


async def test_absent_key_is_a_counted_miss(harness: StoreHarness) -> None:
    store = harness.open()
    job = make_job(2)
    assert await store.get_payload(job.key, expectation(job)) is None
    assert (await store.status(job.key)).state is KeyState.ABSENT
    assert sample(store, "deliberate_store_misses_total") == 1
    assert sample(store, "deliberate_store_hits_total") == 0
    count = sample(
        store, "deliberate_store_operation_seconds_count", op="get", backend=store.backend
    )
    assert count == 1


async def test_fifty_concurrent_enqueues_of_one_key_make_one_job(harness: StoreHarness) -> None:
    store = harness.open()
    # Several handles, as several server processes would have, all racing on one key.
    handles = [store, *(harness.peer(store) for _ in range(4))]
    # Connect first: the race under test is the enqueue, not five cold client start-ups.
    await asyncio.gather(*(handle.ping() for handle in handles))
    job = make_job(3)
    outcomes = await asyncio.gather(*(handles[i % 5].enqueue(job) for i in range(50)))
    assert outcomes.count(EnqueueOutcome.ENQUEUED) == 1
    assert outcomes.count(EnqueueOutcome.ALREADY_PENDING) == 49
    assert (await store.queue_stats()).length == 1
    deliveries = await store.claim_jobs("worker-1", max_jobs=10, block_s=0.2)
    assert [d.job.key for d in deliveries] == [job.key]
    enqueued = sum(
        sample(h, "deliberate_store_enqueue_total", outcome="enqueued") for h in set(handles)
    )
    assert enqueued == 1


async def test_job_held_past_visibility_timeout_is_reclaimed(harness: StoreHarness) -> None:
    store = harness.open(visibility_timeout_s=0.5)
    other = harness.peer(store)
    job = make_job(4)
    await store.enqueue(job)
    [first] = await store.claim_jobs("worker-dies", block_s=0.5)
    # Before the visibility timeout the job stays with its first consumer.
    assert await other.claim_jobs("worker-2", block_s=0.1) == []
    await asyncio.sleep(0.6)
    [second] = await other.claim_jobs("worker-2", block_s=0.5)
    assert second.stream_id == first.stream_id
    assert second.deliveries == 2
    assert second.consumer == "worker-2"
    assert sample(other, "deliberate_store_reclaimed_total") == 1
    await other.publish(second, make_payload(job, seed=1))
    # The slow first consumer finishing late is harmless (at-least-once, idempotent).
    await store.publish(first, make_payload(job, seed=1))
    assert (await store.status(job.key)).state is KeyState.READY
    assert (await store.queue_stats()).length == 0
    assert await store.get_payload(job.key, expectation(job)) is not None


async def test_job_past_max_deliveries_is_dead_lettered(harness: StoreHarness) -> None:
    store = harness.open(visibility_timeout_s=0.3, max_deliveries=2)
    job = make_job(5)
    await store.enqueue(job)
    for attempt in (1, 2):
        [delivery] = await store.claim_jobs(f"crashy-{attempt}", block_s=0.5)
        assert delivery.deliveries == attempt
        await asyncio.sleep(0.4)
    assert await store.claim_jobs("worker-3", block_s=0.1) == []
    status = await store.status(job.key)
    assert status.state is KeyState.FAILED
    assert status.reason is not None and "2 deliveries" in status.reason
    assert status.attempts == 3
    [letter] = await store.dead_letters()
    assert letter.key == job.key and letter.deliveries == 3
    assert await store.enqueue(job) is EnqueueOutcome.FAILED
    stats = await store.queue_stats()
    assert (stats.length, stats.pending, stats.dead_letters) == (0, 0, 1)
    assert sample(store, "deliberate_store_dead_lettered_total") == 1


async def test_fail_keeps_reason_and_count(harness: StoreHarness) -> None:
    store = harness.open()
    job = make_job(6)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.fail(delivery, "prefix longer than the model's context (9000 > 8192)")
    status = await store.status(job.key)
    assert status.state is KeyState.FAILED
    assert status.reason == "prefix longer than the model's context (9000 > 8192)"
    assert status.attempts == 1
    assert (await store.wait_ready(job.key, 1.0)).state is KeyState.FAILED
    [letter] = await store.dead_letters()
    assert letter.reason == status.reason and letter.job_json == job.to_json()


async def test_failed_mark_expires_so_the_key_can_be_retried(harness: StoreHarness) -> None:
    store = harness.open(failed_ttl_s=0.4)
    job = make_job(7)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.fail(delivery, "transient")
    assert await store.enqueue(job) is EnqueueOutcome.FAILED
    await asyncio.sleep(0.5)
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED


async def test_published_value_figure_is_in_payload_and_status(harness: StoreHarness) -> None:
    store = harness.open()
    job = make_job(8)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    figure = ValueFigure(delta=-0.031, std_error=0.012, tokens=26)
    await store.publish(delivery, make_payload(job, value=figure))
    assert (await store.status(job.key)).value == figure
    payload = await store.get_payload(job.key, expectation(job))
    assert payload is not None and payload.value == figure


async def test_declined_key_keeps_its_figure_and_refuses_jobs_until_it_expires(
    harness: StoreHarness,
) -> None:
    store = harness.open(declined_ttl_s=0.4)
    job = make_job(9)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    figure = ValueFigure(delta=0.9, std_error=0.1, tokens=26)
    await store.decline(delivery, figure, "latents confidently harmful on this context")
    status = await store.status(job.key)
    assert status.state is KeyState.DECLINED and status.terminal
    assert status.value == figure and "harmful" in (status.reason or "")
    assert (await store.wait_ready(job.key, 1.0)).state is KeyState.DECLINED
    assert await store.get_payload(job.key, expectation(job)) is None
    assert await store.dead_letters() == []  # declining is not a failure
    assert (await store.queue_stats()).length == 0
    assert await store.enqueue(job) is EnqueueOutcome.DECLINED
    assert sample(store, "deliberate_store_declined_total") == 1
    await asyncio.sleep(0.5)
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED


async def test_value_estimates_are_shared_per_tenant_and_overall(harness: StoreHarness) -> None:
    store = harness.open()
    other = harness.peer(store)  # another process's handle sees the same estimates
    for delta in (0.1, 0.3):
        await store.record_value(COPROCESSOR_FP, "tenant-a", delta)
    await other.record_value(COPROCESSOR_FP, "tenant-b", -0.2)
    await store.record_value(COPROCESSOR_FP + "-other", "tenant-a", 5.0)
    tenant_a, overall = await other.value_estimates(COPROCESSOR_FP, "tenant-a")
    assert tenant_a.n == 2 and tenant_a.mean == pytest.approx(0.2)
    assert tenant_a.std_error == pytest.approx(0.1)
    assert overall.n == 3 and overall.mean == pytest.approx(0.2 / 3)
    fresh, _ = await store.value_estimates(COPROCESSOR_FP, "tenant-c")
    assert fresh.n == 0


def _flip_last_tensor_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0x01])


CORRUPTIONS = {
    # name: (how the stored bytes are made from the job, expected rejection reason)
    "wrong_digest": (lambda job: _flip_last_tensor_byte(make_payload(job)), "digest_mismatch"),
    "wrong_fingerprint": (
        lambda job: make_payload(job, coprocessor_fp=COPROCESSOR_FP + "-other"),
        "fingerprint_mismatch",
    ),
    "truncated": (lambda job: make_payload(job)[:-100], "corrupt"),
    "truncated_header": (lambda job: make_payload(job)[:20], "corrupt"),
    "wrong_dtype": (lambda job: make_payload(job, dtype=torch.float32), "dtype"),
    "wrong_shape": (
        lambda job: make_payload(job, latents=make_latents(0, n_latents=N_LATENTS // 2)),
        "shape",
    ),
    "other_key": (lambda job: make_payload(job, key=make_job(999).key), "key_mismatch"),
    "not_safetensors": (lambda job: b"\x80\x04\x95pickle-ish garbage" * 10, "corrupt"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
async def test_bad_payload_is_rejected_counted_and_never_returned(
    harness: StoreHarness, corruption: str
) -> None:
    store = harness.open()
    job = make_job(8)
    build, reason = CORRUPTIONS[corruption]
    await harness.inject_payload(store, job.key, build(job))
    assert (await store.status(job.key)).state is KeyState.READY

    assert await store.get_payload(job.key, expectation(job)) is None
    assert sample(store, "deliberate_store_payload_rejected_total", reason=reason) == 1
    assert sample(store, "deliberate_store_misses_total") == 1
    assert sample(store, "deliberate_store_hits_total") == 0
    # Deleted, so the next miss can enqueue a fresh job instead of "already ready".
    assert (await store.status(job.key)).state is KeyState.ABSENT
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED


async def test_with_a_secret_only_signed_payloads_are_returned(harness: StoreHarness) -> None:
    store = harness.open()
    secret = b"payload-secret-0123456789"
    job = make_job(10)
    signed_expectation = dataclasses.replace(expectation(job), secret=secret)
    for forged in (make_payload(job), make_payload(job, secret=b"another-secret-0123456789")):
        await harness.inject_payload(store, job.key, forged)
        assert await store.get_payload(job.key, signed_expectation) is None
        assert (await store.status(job.key)).state is KeyState.ABSENT  # deleted
    assert sample(store, "deliberate_store_payload_rejected_total", reason="mac_mismatch") == 2
    await harness.inject_payload(store, job.key, make_payload(job, secret=secret))
    payload = await store.get_payload(job.key, signed_expectation)
    assert payload is not None and torch.equal(payload.latents, make_latents(0).bfloat16())


async def test_oversized_stored_payload_is_rejected(harness: StoreHarness) -> None:
    store = harness.open(max_payload_bytes=1000)
    job = make_job(9)
    await harness.inject_payload(store, job.key, make_payload(job))
    assert await store.get_payload(job.key, expectation(job)) is None
    assert sample(store, "deliberate_store_payload_rejected_total", reason="too_large") == 1


async def test_publish_refuses_a_payload_that_does_not_match_the_job(
    harness: StoreHarness,
) -> None:
    store = harness.open(max_payload_bytes=4000)
    job = make_job(10)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    with pytest.raises(PayloadRejected) as excinfo:
        await store.publish(delivery, make_payload(job, key=make_job(11).key))
    assert excinfo.value.reason == "key_mismatch"
    with pytest.raises(PayloadTooLarge):
        await store.publish(delivery, make_payload(job, latents=torch.randn(64, 64)))
    # Nothing was stored or acked: the job is still in the worker's hands.
    assert (await store.status(job.key)).state is KeyState.PENDING
    assert (await store.queue_stats()).pending == 1


async def test_payload_expires_after_its_ttl(harness: StoreHarness) -> None:
    store = harness.open(payload_ttl_s=0.5)
    job = make_job(12)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.publish(delivery, make_payload(job))
    assert await store.get_payload(job.key, expectation(job)) is not None
    await asyncio.sleep(0.7)
    assert await store.get_payload(job.key, expectation(job)) is None
    assert (await store.status(job.key)).state is KeyState.ABSENT
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED


async def test_full_queue_refuses_and_counts(harness: StoreHarness) -> None:
    store = harness.open(max_queue_length=3)
    jobs = [make_job(20 + i) for i in range(4)]
    for job in jobs[:3]:
        assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
    assert await store.enqueue(jobs[3]) is EnqueueOutcome.QUEUE_FULL
    assert sample(store, "deliberate_store_enqueue_total", outcome="queue_full") == 1
    # A refused key is not left pending: it can be enqueued once there is room.
    assert (await store.status(jobs[3].key)).state is KeyState.ABSENT
    assert (await store.queue_stats()).length == 3
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.publish(delivery, make_payload(delivery.job))
    assert await store.enqueue(jobs[3]) is EnqueueOutcome.ENQUEUED


async def test_wait_ready_is_woken_by_publish_not_by_polling(harness: StoreHarness) -> None:
    # A 30 s poll interval: only a push notification can wake the waiter in time.
    store = harness.open(poll_interval_s=30.0)
    worker = harness.peer(store)
    job = make_job(30)
    await store.enqueue(job)
    waiter = asyncio.create_task(store.wait_ready(job.key, timeout_s=10.0))
    await asyncio.sleep(0.3)
    assert not waiter.done()
    [delivery] = await worker.claim_jobs("worker-1", block_s=0.5)
    published_at = time.monotonic()
    await worker.publish(delivery, make_payload(job))
    status = await asyncio.wait_for(waiter, 5.0)
    assert status.state is KeyState.READY
    # Far below the 30 s poll interval; slack for a loaded 2-core machine.
    assert time.monotonic() - published_at < 3.0


async def test_wait_ready_returns_pending_at_its_deadline(harness: StoreHarness) -> None:
    store = harness.open()
    job = make_job(31)
    await store.enqueue(job)
    start = time.monotonic()
    status = await store.wait_ready(job.key, timeout_s=0.3)
    elapsed = time.monotonic() - start
    assert status.state is KeyState.PENDING
    assert 0.25 <= elapsed < 3.0


async def test_release_hands_the_job_back_at_once(harness: StoreHarness) -> None:
    store = harness.open(visibility_timeout_s=30.0)
    other = harness.peer(store)
    job = make_job(32)
    await store.enqueue(job)
    [held] = await store.claim_jobs("worker-sigterm", block_s=0.5)
    await store.release(held)
    [again] = await other.claim_jobs("worker-2", block_s=0.5)
    assert again.stream_id == held.stream_id
    # A release is not a failed attempt: it does not use up a delivery.
    assert again.deliveries == 1
    # A stale release by the first consumer does not take the job from the second.
    await store.release(held)
    assert await store.claim_jobs("worker-3", block_s=0.1) == []


async def test_ack_drops_the_job_and_frees_the_key(harness: StoreHarness) -> None:
    store = harness.open()
    job = make_job(33)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.ack(delivery)
    assert (await store.status(job.key)).state is KeyState.ABSENT
    stats = await store.queue_stats()
    assert (stats.length, stats.pending) == (0, 0)
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED


async def test_nothing_enqueued_is_lost_through_crashes_and_releases(
    harness: StoreHarness,
) -> None:
    store = harness.open(visibility_timeout_s=0.3, max_deliveries=5)
    jobs = [make_job(100 + i) for i in range(20)]
    for job in jobs:
        assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
    crashed = await harness.peer(store).claim_jobs("worker-crashes", max_jobs=5, block_s=0.5)
    released = await harness.peer(store).claim_jobs("worker-stops", max_jobs=5, block_s=0.5)
    assert len(crashed) == len(released) == 5
    for delivery in released:
        await store.release(delivery)

    finisher = harness.peer(store)
    deadline = time.monotonic() + 10
    done: set[str] = set()
    while len(done) < len(jobs) and time.monotonic() < deadline:
        for delivery in await finisher.claim_jobs("worker-ok", max_jobs=4, block_s=0.2):
            await finisher.publish(delivery, make_payload(delivery.job, seed=len(done)))
            done.add(delivery.job.key)
    assert done == {job.key for job in jobs}
    for job in jobs:
        assert await store.get_payload(job.key, expectation(job)) is not None
    stats = await store.queue_stats()
    assert (stats.length, stats.pending, stats.dead_letters) == (0, 0, 0)


async def test_queue_stats_report_depth_and_set_gauges(harness: StoreHarness) -> None:
    store = harness.open()
    for i in range(3):
        await store.enqueue(make_job(40 + i))
    await store.claim_jobs("worker-1", max_jobs=1, block_s=0.5)
    await asyncio.sleep(0.05)
    stats = await store.queue_stats()
    assert (stats.length, stats.pending, stats.waiting) == (3, 1, 2)
    assert stats.oldest_age_s is not None and stats.oldest_age_s >= 0.04
    assert sample(store, "deliberate_queue_length") == 3
    assert sample(store, "deliberate_queue_pending") == 1


async def test_tenants_and_fingerprints_never_share_payloads(harness: StoreHarness) -> None:
    store = harness.open()
    job_a = make_job(50, tenant="tenant-a")
    job_b = make_job(50, tenant="tenant-b")
    assert job_a.token_ids == job_b.token_ids and job_a.key != job_b.key
    await store.enqueue(job_a)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.publish(delivery, make_payload(job_a))
    assert await store.get_payload(job_b.key, expectation(job_b)) is None
    assert await store.enqueue(job_b) is EnqueueOutcome.ENQUEUED


async def test_claim_waits_for_new_jobs_up_to_block_s(harness: StoreHarness) -> None:
    store = harness.open()
    producer = harness.peer(store)
    start = time.monotonic()
    assert await store.claim_jobs("worker-1", block_s=0.3) == []
    assert 0.25 <= time.monotonic() - start < 3.0

    job = make_job(60)
    claim = asyncio.create_task(store.claim_jobs("worker-1", block_s=5.0))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await producer.enqueue(job)
    [delivery] = await asyncio.wait_for(claim, 5.0)
    assert delivery.job.key == job.key
    assert time.monotonic() - started < 3.0


async def test_enqueue_refuses_a_job_whose_key_does_not_match(harness: StoreHarness) -> None:
    store = harness.open()
    good = make_job(70)
    forged = Job(good.key, good.tenant, good.decoder_fp, good.coprocessor_fp, [1, 2, 3])
    with pytest.raises(MalformedJob):
        await store.enqueue(forged)
    assert (await store.queue_stats()).length == 0


async def test_close_ends_waiters_with_the_last_status(harness: StoreHarness) -> None:
    store = harness.open(poll_interval_s=30.0)
    job = make_job(71)
    await store.enqueue(job)
    waiter = asyncio.create_task(store.wait_ready(job.key, timeout_s=30.0))
    await asyncio.sleep(0.2)
    await store.close()
    status = await asyncio.wait_for(waiter, 3.0)
    assert status.state is KeyState.PENDING


async def test_renew_keeps_a_slow_job_from_being_reclaimed_without_using_a_delivery(
    harness: StoreHarness,
) -> None:
    # Timeouts generous against a loaded machine's scheduling delays (a 0.5 s timeout was
    # overrun between a renewal and the next claim on a busy 2-core box).
    store = harness.open(visibility_timeout_s=2.0)
    other = harness.peer(store)
    job = make_job(80)
    await store.enqueue(job)
    [held] = await store.claim_jobs("worker-slow", block_s=0.5)
    # Renewed every 0.5 s for 3 s, 1.5 visibility timeouts: never reclaimed meanwhile.
    for _ in range(6):
        await asyncio.sleep(0.5)
        assert await store.renew([held]) == [held]
        assert await other.claim_jobs("worker-2", block_s=0.0) == []
    assert sample(store, "deliberate_store_renewed_total") == 6
    # Renewal did not count deliveries: once the heartbeat stops, the next taker is the 2nd.
    await asyncio.sleep(2.1)
    [taken] = await other.claim_jobs("worker-2", block_s=0.5)
    assert (taken.stream_id, taken.deliveries) == (held.stream_id, 2)
    # A stale heartbeat of the first consumer neither renews nor takes the job back.
    assert await store.renew([held]) == []
    assert sample(store, "deliberate_store_renew_lost_total") == 1
    assert await other.renew([taken]) == [taken]
    await other.publish(taken, make_payload(job))
    assert (await store.status(job.key)).attempts == 2
    assert await other.renew([taken]) == []  # finished: nothing left to renew
    with pytest.raises(ValueError):
        await store.renew([held, dataclasses.replace(taken, consumer="someone-else")])


async def test_requeue_puts_a_dead_letter_back_and_clears_the_failed_mark(
    harness: StoreHarness,
) -> None:
    store = harness.open()
    jobs = [make_job(90), make_job(91)]
    for job in jobs:
        await store.enqueue(job)
    for delivery in await store.claim_jobs("worker-1", max_jobs=2, block_s=0.5):
        await store.fail(delivery, "out of memory")
    assert await store.enqueue(jobs[0]) is EnqueueOutcome.FAILED
    letters = {letter.key: letter for letter in await store.dead_letters()}
    assert set(letters) == {job.key for job in jobs}

    assert await store.requeue(letters[jobs[0].key]) is EnqueueOutcome.ENQUEUED
    status = await store.status(jobs[0].key)
    assert status.state is KeyState.PENDING and status.attempts == 0
    assert [letter.key for letter in await store.dead_letters()] == [jobs[1].key]
    assert (await store.status(jobs[1].key)).state is KeyState.FAILED  # only the one asked
    assert sample(store, "deliberate_store_requeued_total") == 1
    # Requeued as a fresh job: delivered from 1, not counted against the old deliveries.
    [delivery] = await store.claim_jobs("worker-2", block_s=0.5)
    assert delivery.job.key == jobs[0].key and delivery.deliveries == 1
    assert delivery.job.enqueued_at > letters[jobs[0].key].failed_at - 1
    await store.publish(delivery, make_payload(jobs[0]))
    assert (await store.status(jobs[0].key)).state is KeyState.READY


async def test_requeue_refuses_a_letter_without_a_valid_job(harness: StoreHarness) -> None:
    store = harness.open()
    job = make_job(92)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.fail(delivery, "poison")
    [letter] = await store.dead_letters()
    with pytest.raises(MalformedJob):
        await store.requeue(dataclasses.replace(letter, key=None))
    with pytest.raises(MalformedJob):
        await store.requeue(dataclasses.replace(letter, job_json='{"v": 1}'))
    assert (await store.status(job.key)).state is KeyState.FAILED
    assert len(await store.dead_letters()) == 1


async def test_prune_removes_idle_consumers_that_hold_nothing(harness: StoreHarness) -> None:
    store = harness.open(visibility_timeout_s=30.0)
    jobs = [make_job(93), make_job(94)]
    for job in jobs:
        await store.enqueue(job)
    [done] = await store.claim_jobs("worker-done", block_s=0.5)
    await store.publish(done, make_payload(done.job))
    [busy] = await store.claim_jobs("worker-busy", block_s=0.5)
    await asyncio.sleep(0.4)
    assert await store.claim_jobs("worker-fresh", block_s=0.0) == []
    assert await store.claim_jobs("worker-self", block_s=0.0) == []
    # Only the one that is idle past the bound and holds no job: never a consumer with a
    # pending job (its entries would become unclaimable), never a fresh one, never `keep`.
    removed = await store.prune_consumers(0.3, keep="worker-self")
    assert removed == ["worker-done"]
    assert sample(store, "deliberate_store_consumers_removed_total") == 1
    assert await store.prune_consumers(0.3, keep="worker-self") == []
    await store.publish(busy, make_payload(busy.job))
    assert (await store.status(busy.job.key)).state is KeyState.READY
    with pytest.raises(ValueError):
        await store.prune_consumers(0)
