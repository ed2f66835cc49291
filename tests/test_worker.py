"""The worker pool for real: `deliberate worker` processes sharing a real redis-server, the
real SmolLM2 decoder and a real (untrained, prefix-dependent) coprocessor checkpoint.

Worker processes take ~15-30 s to load on a busy 2-core machine, so the non-destructive
tests share one pool of two workers; the SIGTERM and SIGKILL tests run their victim alone
on their own redis-server, so the victim is sure to hold a full claim when it is signalled.
"""

from __future__ import annotations

import ast
import asyncio
import json
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis as redis_sync
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cache_store import (
    AugmentationStore,
    EnqueueOutcome,
    Job,
    KeyState,
    PayloadExpectation,
    open_store,
)
from cache_store.errors import StoreUnavailable
from cache_store.fingerprint import checkpoint_fingerprint, decoder_fingerprint
from cache_store.keys import CONSUMER_GROUP, JOB_STREAM
from coprocessor_worker.coprocessor import Coprocessor
from coprocessor_worker.worker import AugmentationWorker, WorkerLimits, WorkerMetrics
from tests.fixtures.processes import ServiceProcess, spawn_worker
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.slow

N_LATENTS = 4  # the fixture checkpoint's
HIDDEN = 576  # SmolLM2-135M
MAX_MODEL_LEN = 512
VOCAB = 49152
TENANT = "tenant-w"


# --------------------------------------------------------------------------- helpers


class Fingerprints:
    def __init__(self, decoder: str, coprocessor: str) -> None:
        self.decoder = decoder
        self.coprocessor = coprocessor

    def job(self, token_ids: list[int], *, tenant: str = TENANT, **fp: str) -> Job:
        return Job.create(
            tenant=tenant,
            decoder_fp=fp.get("decoder_fp", self.decoder),
            coprocessor_fp=fp.get("coprocessor_fp", self.coprocessor),
            token_ids=token_ids,
        )

    def jobs(self, count: int, length: int | tuple[int, int], seed: int) -> list[Job]:
        """Distinct prefixes of real-looking token ids (random within the vocabulary)."""
        rng = random.Random(seed)
        lo, hi = (length, length) if isinstance(length, int) else length
        return [
            self.job([rng.randrange(3, VOCAB) for _ in range(rng.randint(lo, hi))])
            for _ in range(count)
        ]


def expectation(job: Job) -> PayloadExpectation:
    return PayloadExpectation.for_job(job, n_latents=N_LATENTS, hidden=HIDDEN, dtype=torch.bfloat16)


def worker_args(checkpoint: Path, *extra: str) -> list[str]:
    return [
        "--coprocessor",
        str(checkpoint),
        "--torch-threads",
        "1",  # two cores, shared: one thread per worker keeps several workers fair
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--worker-claim-block-seconds",
        "0.5",
        *extra,
    ]


def start_workers(log_dir: Path, redis_url: str, *argsets: list[str]) -> list[ServiceProcess]:
    """Start several workers at once (their model loads overlap) and wait for all."""
    workers = [spawn_worker(log_dir, redis_url, *args) for args in argsets]
    try:
        for worker in workers:
            worker.wait_ready(f"{worker.health_url}/ready", timeout_s=240)  # type: ignore[attr-defined]
    except Exception:
        for worker in workers:
            worker.stop()
        raise
    return workers


def scrape(worker: ServiceProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a worker's /metrics, by (name, sorted labels)."""
    text = httpx.get(f"{worker.health_url}/metrics", timeout=10).text  # type: ignore[attr-defined]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def jobs_done(worker: ServiceProcess) -> float:
    return metric(scrape(worker), "deliberate_worker_jobs_total", outcome="done")


async def poll(
    check: Callable[[], Awaitable[bool]], timeout_s: float, what: str, every_s: float = 0.1
) -> None:
    """Wait until `check()` is true, or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(every_s)


async def enqueue_all(store: AugmentationStore, jobs: list[Job]) -> None:
    outcomes = await asyncio.gather(*(store.enqueue(job) for job in jobs))
    assert set(outcomes) == {EnqueueOutcome.ENQUEUED}, outcomes


async def wait_all_ready(store: AugmentationStore, jobs: list[Job], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    for job in jobs:
        status = await store.wait_ready(job.key, max(0.1, deadline - time.monotonic()))
        assert status.state is KeyState.READY, (job.key, status)


def pending_for(redis_url: str, consumer: str) -> list[str]:
    """Stream ids that `consumer` holds unacknowledged (XPENDING, extended form)."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        entries = client.xpending_range(JOB_STREAM, CONSUMER_GROUP, "-", "+", 100, consumer)
        return [e["message_id"].decode() for e in entries]
    except redis_sync.ResponseError:  # no group yet: the worker has not claimed anything
        return []
    finally:
        client.close()


def keys_of(redis_url: str, stream_ids: list[str]) -> set[str]:
    client = redis_sync.Redis.from_url(redis_url)
    try:
        keys = set()
        for stream_id in stream_ids:
            ((_, fields),) = client.xrange(JOB_STREAM, stream_id, stream_id)
            keys.add(json.loads(fields[b"job"])["key"])
        return keys
    finally:
        client.close()


def wait_exit(process: ServiceProcess, timeout_s: float) -> int:
    try:
        return process.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"{process.name} still running {timeout_s} s after the signal:\n{process.log_tail()}"
        ) from None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fingerprints(bundled_decoder: Path, coprocessor_checkpoint: Path) -> Fingerprints:
    return Fingerprints(
        decoder_fingerprint(bundled_decoder), checkpoint_fingerprint(coprocessor_checkpoint)
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="module")
def pool(
    module_redis: RedisServer, logs: Path, coprocessor_checkpoint: Path
) -> Iterator[list[ServiceProcess]]:
    """Two workers on one consumer group, default visibility timeout (120 s): in the normal
    case nothing is ever reclaimed, so a job done twice would be a bug."""
    workers = start_workers(
        logs,
        module_redis.url,
        *(
            worker_args(coprocessor_checkpoint, "--worker-consumer", name,
                        "--worker-batch-max-jobs", "4")
            for name in ("pool-a", "pool-b")
        ),
    )  # fmt: skip
    yield workers
    for worker in workers:
        assert worker.stop() == 0, worker.log_tail()


@pytest.fixture
async def pool_store(module_redis: RedisServer) -> AsyncIterator[AugmentationStore]:
    store = open_store(module_redis.url, registry=CollectorRegistry(), op_timeout_s=5.0)
    yield store
    await store.close()


@pytest.fixture(scope="module")
def coprocessor(bundled_decoder: Path, coprocessor_checkpoint: Path) -> Coprocessor:
    torch.set_num_threads(1)  # the worker processes need the other core
    return Coprocessor.load(
        coprocessor_checkpoint, bundled_decoder, dtype=torch.float32, compute_dtype=torch.float32
    )


# --------------------------------------------------------------------------- the pool


async def test_two_workers_share_the_group_and_do_each_job_once(
    pool: list[ServiceProcess],
    pool_store: AugmentationStore,
    fingerprints: Fingerprints,
    coprocessor: Coprocessor,
) -> None:
    before = [jobs_done(w) for w in pool]
    jobs = fingerprints.jobs(12, (8, 40), seed=1)
    await enqueue_all(pool_store, jobs)
    await wait_all_ready(pool_store, jobs, timeout_s=240)

    for job in jobs:
        payload = await pool_store.get_payload(job.key, expectation(job))
        assert payload is not None, f"{job.key} is ready but its payload failed verification"
        status = await pool_store.status(job.key)
        assert status.attempts == 1, f"{job.key} was delivered {status.attempts} times"
    # The latents are the coprocessor's for that prefix, not merely well-formed bytes.
    reference = coprocessor.latents([jobs[0].token_ids])[0].to(torch.bfloat16)
    payload = await pool_store.get_payload(jobs[0].key, expectation(jobs[0]))
    assert payload is not None
    torch.testing.assert_close(payload.latents.float(), reference.float(), atol=2e-2, rtol=2e-2)

    done = [jobs_done(w) - b for w, b in zip(pool, before, strict=True)]
    assert sum(done) == len(jobs), f"jobs done per worker {done}: some job was done twice"
    assert all(d > 0 for d in done), f"one worker did everything: {done}"
    for worker in pool:
        assert metric(scrape(worker), "deliberate_store_reclaimed_total") == 0
    stats = await pool_store.queue_stats()
    assert (stats.length, stats.pending) == (0, 0)


async def test_poison_jobs_are_dead_lettered_with_a_reason_and_serving_goes_on(
    pool: list[ServiceProcess],
    module_redis: RedisServer,
    pool_store: AugmentationStore,
    fingerprints: Fingerprints,
) -> None:
    too_long = fingerprints.job([7] * (MAX_MODEL_LEN + 10))
    out_of_vocab = fingerprints.job([5, 6, VOCAB + 100, 7])
    other_coprocessor = fingerprints.job([5, 6, 7, 8], coprocessor_fp="f" * 32)
    poison = [too_long, out_of_vocab, other_coprocessor]
    good = fingerprints.jobs(3, 16, seed=2)
    dead_before = len(await pool_store.dead_letters(1000))
    await enqueue_all(pool_store, poison)
    # A malformed entry can only come from outside our code: write it with redis-py directly.
    raw = redis_sync.Redis.from_url(module_redis.url)
    try:
        raw.xadd(JOB_STREAM, {"job": b'{"v": 1, "key": "not-a-job"'})
    finally:
        raw.close()
    await enqueue_all(pool_store, good)

    await wait_all_ready(pool_store, good, timeout_s=120)

    async def all_buried() -> bool:
        return len(await pool_store.dead_letters(1000)) >= dead_before + 4

    await poll(all_buried, 30, "4 dead letters")
    letters = await pool_store.dead_letters(1000)
    by_key = {letter.key: letter.reason for letter in letters}
    assert "exceeds" in by_key[too_long.key]
    assert "vocabulary" in by_key[out_of_vocab.key]
    assert "coprocessor" in by_key[other_coprocessor.key]
    malformed = [letter for letter in letters if letter.key is None]
    assert malformed and "not a valid Deliberate job" in malformed[0].reason
    for job in poison:
        status = await pool_store.status(job.key)
        assert status.state is KeyState.FAILED and status.reason
    assert all(w.process.poll() is None for w in pool), "a poison job took a worker down"
    stats = await pool_store.queue_stats()
    assert stats.length == 0, "a dead-lettered entry was left on the job stream"


async def test_health_ready_and_metrics(
    pool: list[ServiceProcess], pool_store: AugmentationStore, fingerprints: Fingerprints
) -> None:
    for worker in pool:
        base = worker.health_url  # type: ignore[attr-defined]
        assert httpx.get(f"{base}/health", timeout=5).json() == {"status": "ok"}
        assert httpx.get(f"{base}/ready", timeout=5).status_code == 200
    before = [scrape(w) for w in pool]
    (job,) = fingerprints.jobs(1, 24, seed=3)
    await enqueue_all(pool_store, [job])
    await wait_all_ready(pool_store, [job], timeout_s=60)
    after = [scrape(w) for w in pool]

    def delta(name: str, **labels: str) -> float:
        return sum(
            metric(a, name, **labels) - metric(b, name, **labels)
            for a, b in zip(after, before, strict=True)
        )

    assert delta("deliberate_worker_jobs_total", outcome="done") == 1
    assert delta("deliberate_worker_batch_size_count") == 1
    assert delta("deliberate_worker_batch_size_sum") == 1
    assert delta("deliberate_worker_compute_seconds_count") == 1
    assert delta("deliberate_worker_compute_seconds_sum") > 0
    for samples in after:
        # Series exist from the start, so rates and alerts see zeros.
        assert ("deliberate_worker_jobs_total", (("outcome", "released"),)) in samples
        # An idle worker's last claim found nothing waiting: no stale lag.
        assert ("deliberate_worker_queue_lag_seconds", ()) in samples
        assert ("deliberate_queue_length", ()) in samples


async def test_workers_recreate_the_group_when_redis_restarts_empty(
    pool: list[ServiceProcess],
    module_redis: RedisServer,
    pool_store: AugmentationStore,
    fingerprints: Fingerprints,
) -> None:
    module_redis.stop()
    module_redis.start()  # same port, no persistence: stream and consumer group are gone
    jobs = fingerprints.jobs(2, 16, seed=5)

    accepted = {EnqueueOutcome.ENQUEUED, EnqueueOutcome.ALREADY_PENDING}

    async def enqueued() -> bool:
        try:  # the store's connections notice the restart on first use: retry until accepted
            return all([await pool_store.enqueue(job) in accepted for job in jobs])
        except StoreUnavailable:
            return False

    await poll(enqueued, 30, "enqueue after the restart", every_s=0.5)
    await wait_all_ready(pool_store, jobs, timeout_s=120)
    assert all(w.process.poll() is None for w in pool)


# --------------------------------------------------------------------------- crashes


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


async def test_sigterm_mid_batch_finishes_or_releases_and_exits_zero(
    own_redis: RedisServer,
    logs: Path,
    coprocessor_checkpoint: Path,
    fingerprints: Fingerprints,
) -> None:
    store = open_store(own_redis.url, registry=CollectorRegistry(), op_timeout_s=5.0)
    # 8 jobs of 96 tokens; the victim claims 6 and computes them 3 at a time: SIGTERM during
    # its first batch must publish that batch and release the other 3.
    jobs = fingerprints.jobs(8, 96, seed=6)
    await enqueue_all(store, jobs)
    victim_args = worker_args(
        coprocessor_checkpoint,
        "--worker-consumer", "victim-term",
        "--worker-batch-max-jobs", "6",
        "--worker-batch-max-tokens", str(3 * 96),
    )  # fmt: skip
    (victim,) = start_workers(logs, own_redis.url, victim_args)
    survivor = None
    try:
        held: list[str] = []

        async def holds_a_claim() -> bool:
            held[:] = pending_for(own_redis.url, "victim-term")
            return len(held) > 0

        await poll(holds_a_claim, 60, "the victim to claim jobs", every_s=0.02)
        held_keys = keys_of(own_redis.url, held)
        victim.signal(signal.SIGTERM)
        signalled = time.monotonic()
        # Promptly: the batch in hand (3 x 96 tokens: ~2 s idle, ~7 s on the busy test
        # machine) plus about a second of shutdown; well inside a 30 s grace period.
        assert wait_exit(victim, 30) == 0, victim.log_tail()
        print(f"victim exited {time.monotonic() - signalled:.1f} s after SIGTERM")
        log = victim.log_path.read_text()
        summary = re.search(r"stopped: (\{.*\})", log)
        assert summary, log[-2000:]
        outcomes = ast.literal_eval(summary.group(1))
        # The first claim's 3 that do not fit its batch are handed back at once; whether the
        # signal lands in the first batch or a later one, every job the victim did not finish
        # goes back (checked below: ready = done, the rest on the stream, then all finished by
        # the survivor with no extra delivery). Counts are of the whole run, so they are not
        # compared with `held`: the victim may claim again before the poll above reads it.
        assert outcomes.get("released", 0) >= 3, outcomes

        # Nothing lost: each job is ready or back on the stream for others, none in limbo.
        stats = await store.queue_stats()
        ready = [j for j in jobs if (await store.status(j.key)).state is KeyState.READY]
        assert len(ready) == outcomes.get("done", 0)
        assert stats.length == len(jobs) - len(ready)

        survivor_args = worker_args(coprocessor_checkpoint, "--worker-consumer", "survivor")
        (survivor,) = start_workers(logs, own_redis.url, survivor_args)
        await wait_all_ready(store, jobs, timeout_s=240)
        assert held_keys <= {j.key for j in jobs}
        for job in jobs:
            assert await store.get_payload(job.key, expectation(job)) is not None
            # A released job keeps its delivery count: redone once, never counted as a crash.
            assert (await store.status(job.key)).attempts == 1
        assert (await store.queue_stats()).length == 0
        assert await store.dead_letters() == []
    finally:
        victim.stop()
        if survivor is not None:
            assert survivor.stop() == 0, survivor.log_tail()
        await store.close()


async def test_sigkill_mid_batch_loses_nothing(
    own_redis: RedisServer,
    logs: Path,
    coprocessor_checkpoint: Path,
    fingerprints: Fingerprints,
) -> None:
    visibility = "4"
    store = open_store(own_redis.url, registry=CollectorRegistry(), op_timeout_s=5.0)
    jobs = fingerprints.jobs(6, 128, seed=7)
    await enqueue_all(store, jobs)
    (victim,) = start_workers(
        logs,
        own_redis.url,
        worker_args(
            coprocessor_checkpoint,
            "--worker-consumer", "victim-kill",
            "--worker-batch-max-jobs", "6",  # one long batch: the kill lands mid-compute
            "--visibility-timeout-seconds", visibility,
        ),
    )  # fmt: skip
    rescuer = None
    try:
        held: list[str] = []

        async def holds_a_claim() -> bool:
            held[:] = pending_for(own_redis.url, "victim-kill")
            return len(held) > 0

        await poll(holds_a_claim, 60, "the victim to claim jobs", every_s=0.02)
        held_keys = keys_of(own_redis.url, held)
        victim.signal(signal.SIGKILL)
        assert wait_exit(victim, 10) == -signal.SIGKILL
        # Killed mid-compute: the claimed jobs are still pending in the victim's name.
        still_held = keys_of(own_redis.url, pending_for(own_redis.url, "victim-kill"))
        assert still_held, "the victim finished before the kill; use longer prefixes"

        (rescuer,) = start_workers(
            logs,
            own_redis.url,
            worker_args(
                coprocessor_checkpoint,
                "--worker-consumer", "rescuer",
                "--visibility-timeout-seconds", visibility,
            ),
        )  # fmt: skip
        await wait_all_ready(store, jobs, timeout_s=240)
        for job in jobs:
            assert await store.get_payload(job.key, expectation(job)) is not None
            attempts = (await store.status(job.key)).attempts
            # The jobs the dead worker held were delivered again; the others once.
            assert attempts == (2 if job.key in still_held else 1), (job.key, attempts)
        assert still_held <= held_keys
        reclaimed = metric(scrape(rescuer), "deliberate_store_reclaimed_total")
        assert reclaimed == len(still_held)
        assert (await store.queue_stats()).length == 0
        assert await store.dead_letters() == []
    finally:
        victim.stop()
        if rescuer is not None:
            assert rescuer.stop() == 0, rescuer.log_tail()
        await store.close()


# --------------------------------------------------------------------------- start-up


def test_checkpoint_for_another_decoder_is_refused_at_start(
    own_redis: RedisServer, logs: Path, coprocessor_checkpoint: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other-decoder-ckpt"
    shutil.copytree(coprocessor_checkpoint, other)
    meta_path = other / "deliberate.json"
    meta = json.loads(meta_path.read_text())
    actual = meta["decoder_fingerprint"]
    meta["decoder_fingerprint"] = "0123456789abcdef" * 2
    meta_path.write_text(json.dumps(meta))

    worker = spawn_worker(logs, own_redis.url, *worker_args(other))
    try:
        code = worker.process.wait(120)
    finally:
        worker.stop()
    out = worker.log_path.read_text()
    assert code != 0
    assert "refusing to start" in out and "0123456789abcdef" * 2 in out and actual in out, out
    assert "Traceback" not in out, "an operator error should read as one clear line"


# --------------------------------------------------------------------------- in process


def test_batched_latents_equal_single_latents_on_the_real_model(
    coprocessor: Coprocessor,
) -> None:
    rng = random.Random(8)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(n)] for n in (5, 61, 130, 17)]
    batched = coprocessor.latents(prefixes)
    singles = [coprocessor.latents([p])[0] for p in prefixes]
    for a, b in zip(batched, singles, strict=True):
        assert a.shape == (N_LATENTS, HIDDEN) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # Not vacuous: the latents depend on the prefix far beyond the tolerance.
    assert (batched[0] - batched[1]).abs().max() > 1e-2


async def test_embedded_worker_loop_on_the_memory_store(
    coprocessor: Coprocessor, fingerprints: Fingerprints
) -> None:
    """`deliberate serve`'s embedded mode: the same loop, in process, on the in-memory store."""
    store = open_store(None, registry=CollectorRegistry())
    limits = WorkerLimits(
        max_jobs=4, max_tokens=4096, max_prefix_tokens=MAX_MODEL_LEN - N_LATENTS,
        vocab_size=VOCAB, block_s=0.2,
    )  # fmt: skip
    worker = AugmentationWorker(
        store, coprocessor, consumer="embedded", limits=limits,
        metrics=WorkerMetrics(CollectorRegistry()),
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        jobs = fingerprints.jobs(3, (10, 30), seed=9)
        too_long = fingerprints.job([9] * MAX_MODEL_LEN)
        await enqueue_all(store, [*jobs, too_long])
        await wait_all_ready(store, jobs, timeout_s=120)
        for job in jobs:
            payload = await store.get_payload(job.key, expectation(job))
            assert payload is not None
            reference = coprocessor.latents([job.token_ids])[0].to(torch.bfloat16)
            torch.testing.assert_close(payload.latents, reference, atol=2e-2, rtol=2e-2)
        status = await store.wait_ready(too_long.key, 30)
        assert status.state is KeyState.FAILED and "exceeds" in (status.reason or "")
        assert worker.outcomes["done"] == 3 and worker.outcomes["failed"] == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await store.close()
    assert not worker.ready


async def test_queue_lag_is_the_wait_of_the_claimed_jobs_and_zero_when_idle(
    coprocessor: Coprocessor, fingerprints: Fingerprints
) -> None:
    store = open_store(None, registry=CollectorRegistry())
    registry = CollectorRegistry()
    limits = WorkerLimits(
        max_jobs=4, max_tokens=4096, max_prefix_tokens=MAX_MODEL_LEN - N_LATENTS,
        vocab_size=VOCAB, block_s=0.05,
    )  # fmt: skip
    worker = AugmentationWorker(
        store, coprocessor, consumer="lag", limits=limits, metrics=WorkerMetrics(registry)
    )
    (fresh,) = fingerprints.jobs(1, 8, seed=10)
    # Waited 90 s already (enqueued_at is the producer's clock, as in production).
    stale = Job(fresh.key, fresh.tenant, fresh.decoder_fp, fresh.coprocessor_fp,
                fresh.token_ids, enqueued_at=time.time() - 90)  # fmt: skip
    try:
        await enqueue_all(store, [stale])
        assert await worker.step() == 1
        lag = registry.get_sample_value("deliberate_worker_queue_lag_seconds")
        assert lag is not None and 90 <= lag < 150
        assert await worker.step() == 0
        # An empty claim means nothing is waiting: the gauge must not hold the old value.
        assert registry.get_sample_value("deliberate_worker_queue_lag_seconds") == 0
    finally:
        await store.close()
