"""Redis-only behaviour: a killed worker process, outages and hangs, recovery, URLs.

Every test runs its own redis-server on a free port (never the machine's shared one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.asyncio.sentinel import SentinelConnectionPool

from cache_store import (
    CONSUMER_GROUP,
    JOB_STREAM,
    EnqueueOutcome,
    KeyState,
    StoreUnavailable,
    open_store,
    redact,
)
from cache_store.factory import _parse_multi_host, redis_client
from cache_store.keys import claim_key
from cache_store.redis_store import RedisStore
from cache_store.store import AugmentationStore
from tests.fixtures.redis_server import RedisServer, free_port
from tests.fixtures.redis_topologies import LocalSentinel
from tests.fixtures.store_backends import FAST, expectation, make_job, make_payload, sample

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "scripts" / "claim_and_hang.py"

ServerFactory = Callable[..., RedisServer]
T = TypeVar("T")


def _open(server: RedisServer, **overrides: Any) -> AugmentationStore:
    return open_store(server.url, registry=CollectorRegistry(), **(FAST | overrides))


async def test_job_of_a_killed_worker_process_is_reclaimed_and_finished(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    store = _open(server, visibility_timeout_s=1.0)
    job = make_job(1)
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    worker = subprocess.Popen(
        [sys.executable, str(HELPER), server.url, "worker-killed"],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(worker.stdout.readline), 120)
        [held] = json.loads(line)
        assert held["key"] == job.key and held["deliveries"] == 1
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    assert worker.returncode == -signal.SIGKILL

    stats = await store.queue_stats()
    assert (stats.length, stats.pending) == (1, 1)
    assert await store.claim_jobs("worker-2", block_s=0.1) == []  # not idle long enough yet
    await asyncio.sleep(1.1)
    [delivery] = await store.claim_jobs("worker-2", block_s=0.5)
    assert delivery.stream_id == held["stream_id"]
    assert delivery.deliveries == 2
    await store.publish(delivery, make_payload(job))
    assert (await store.status(job.key)).state is KeyState.READY
    assert await store.get_payload(job.key, expectation(job)) is not None
    stats = await store.queue_stats()
    assert (stats.length, stats.pending) == (0, 0)
    await store.close()


async def _recovers(call: Callable[[], Awaitable[T]], within_s: float = 10.0) -> T:
    """The result of `call` once it stops raising StoreUnavailable (the same store object,
    no reconnect by the caller); fail if that takes longer than `within_s`."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return await call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _relax(store: AugmentationStore) -> None:
    # After the outage the test checks data, not latency: do not let a loaded machine turn
    # a slow call into a false failure.
    store.config = dataclasses.replace(store.config, op_timeout_s=5.0)


async def _fails_fast(call: Awaitable[Any], budget_s: float) -> float:
    start = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await call
    elapsed = time.monotonic() - start
    assert elapsed < budget_s, f"took {elapsed:.2f}s, budget {budget_s}s"
    return elapsed


async def test_redis_killed_calls_fail_fast_then_recover_and_nothing_acked_is_lost(
    redis_server_factory: ServerFactory,
) -> None:
    # appendfsync always: what Redis acknowledged is on disk when it is killed with -9.
    server = redis_server_factory(appendonly=True)
    op_timeout = 0.5
    store = _open(server, op_timeout_s=op_timeout, visibility_timeout_s=0.5)
    done, held, waiting = make_job(1), make_job(2), make_job(3)
    await store.enqueue(done)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.publish(delivery, make_payload(done))  # acked
    await store.enqueue(held)
    [in_hand] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.enqueue(waiting)

    server.kill()
    budget = op_timeout + 1.0  # "no hang": bounded, with slack for a loaded machine
    await _fails_fast(store.get_payload(done.key, expectation(done)), budget)
    await _fails_fast(store.status(done.key), budget)
    await _fails_fast(store.enqueue(make_job(4)), budget)
    await _fails_fast(store.claim_jobs("worker-1", block_s=0.0), budget)
    await _fails_fast(store.publish(in_hand, make_payload(held)), budget)
    await _fails_fast(store.queue_stats(), budget)
    await _fails_fast(store.ping(), budget)
    assert sample(store, "deliberate_store_errors_total", op="get") == 1
    assert sample(store, "deliberate_store_errors_total", op="publish") == 1

    server.start()  # same port, state reloaded from the append-only file
    # The same store object recovers by itself.
    payload = await _recovers(lambda: store.get_payload(done.key, expectation(done)))
    assert payload is not None
    _relax(store)
    assert (await store.status(held.key)).state is KeyState.PENDING
    assert (await store.status(waiting.key)).state is KeyState.PENDING
    # The unacked job and the waiting job both come back and can be finished.
    await asyncio.sleep(0.5)
    deliveries = await store.claim_jobs("worker-2", max_jobs=5, block_s=0.5)
    assert {d.job.key for d in deliveries} == {held.key, waiting.key}
    for d in deliveries:
        await store.publish(d, make_payload(d.job))
    for job in (done, held, waiting):
        assert await store.get_payload(job.key, expectation(job)) is not None
    stats = await store.queue_stats()
    assert (stats.length, stats.pending) == (0, 0)
    await store.close()


async def test_hung_redis_calls_time_out_within_budget_then_recover(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    op_timeout = 0.5
    store = _open(server, op_timeout_s=op_timeout)
    job = make_job(5)
    await store.enqueue(job)

    server.pause()  # the port accepts connections but nothing answers
    try:
        budget = op_timeout + 1.0  # "no hang": bounded, with slack for a loaded machine
        await _fails_fast(store.status(job.key), budget)
        # The request path's own, smaller lookup budget is honoured too.
        await _fails_fast(store.get_payload(job.key, expectation(job), timeout_s=0.05), 1.0)
        await _fails_fast(store.enqueue(make_job(6)), budget)
        await _fails_fast(store.claim_jobs("worker-1", block_s=0.2), budget + 0.2)
        await _fails_fast(store.wait_ready(job.key, timeout_s=5.0), budget)
    finally:
        server.resume()
    assert (await _recovers(lambda: store.status(job.key))).state is KeyState.PENDING
    _relax(store)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.publish(delivery, make_payload(job))
    assert await store.get_payload(job.key, expectation(job)) is not None
    await store.close()


async def test_refused_connection_fails_fast(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory()
    server.stop()
    store = _open(server, op_timeout_s=0.5)
    await _fails_fast(store.ping(), 1.5)
    await _fails_fast(store.enqueue(make_job(7)), 1.5)
    server.start()
    assert await _recovers(lambda: store.enqueue(make_job(7))) is EnqueueOutcome.ENQUEUED
    await store.close()


async def test_waiter_is_woken_after_redis_restarts(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory(appendonly=True)
    store = _open(server, poll_interval_s=30.0)
    job = make_job(8)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.wait_ready(job.key, timeout_s=0.1)  # starts the events listener
    assert isinstance(store, RedisStore) and store.subscriptions == 1
    server.kill()
    server.start()
    for _ in range(100):  # the listener notices, backs off and resubscribes
        await asyncio.sleep(0.05)
        if store.subscriptions == 2:
            break
    assert store.subscriptions == 2
    waiter = asyncio.create_task(store.wait_ready(job.key, timeout_s=10.0))
    await asyncio.sleep(0.2)
    worker = _open(server)
    published_at = time.monotonic()
    await worker.publish(delivery, make_payload(job))
    assert (await asyncio.wait_for(waiter, 5.0)).state is KeyState.READY
    assert time.monotonic() - published_at < 3.0  # far below the 30 s poll interval
    await worker.close()
    await store.close()


async def test_malformed_stream_entry_is_dead_lettered_not_delivered(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    store = _open(server)
    raw = aioredis.Redis.from_url(server.url)
    good = make_job(9)
    forged = json.loads(make_job(10).to_json())
    forged["token_ids"] = [1, 2, 3]  # no longer hashes to its key
    await raw.xadd(JOB_STREAM, {"job": json.dumps(forged)})
    await raw.xadd(JOB_STREAM, {"job": "not json"})
    await store.enqueue(good)
    deliveries = await store.claim_jobs("worker-1", max_jobs=5, block_s=0.5)
    assert [d.job.key for d in deliveries] == [good.key]
    letters = await store.dead_letters()
    assert len(letters) == 2
    assert all("not a valid Deliberate job" in letter.reason or "hash" in letter.reason
               for letter in letters)  # fmt: skip
    assert (await store.status(forged["key"])).state is KeyState.ABSENT
    await raw.aclose()
    await store.close()


async def test_lost_consumer_group_is_recreated(redis_server_factory: ServerFactory) -> None:
    server = redis_server_factory()
    store = _open(server)
    assert await store.claim_jobs("worker-1", block_s=0.0) == []  # creates the group
    raw = aioredis.Redis.from_url(server.url)
    await raw.flushall()  # as a restart without persistence would
    job = make_job(11)
    await store.enqueue(job)
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    assert delivery.job.key == job.key
    groups = await raw.xinfo_groups(JOB_STREAM)
    assert [g["name"] for g in groups] == [CONSUMER_GROUP.encode()]
    await raw.aclose()
    await store.close()


async def test_claim_left_by_a_dead_enqueue_is_taken_over(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    store = _open(server)
    raw = aioredis.Redis.from_url(server.url)
    fresh, stale = make_job(12), make_job(13)
    now_ms = int(time.time() * 1000)
    # An enqueue that took its claim and died before adding the job, just now / long ago.
    await raw.set(claim_key(fresh.key), f"t:abc123:{now_ms}", px=60_000)
    await raw.set(claim_key(stale.key), f"t:abc123:{now_ms - 60_000}", px=60_000)
    assert await store.enqueue(fresh) is EnqueueOutcome.ALREADY_PENDING
    assert await store.enqueue(stale) is EnqueueOutcome.ENQUEUED
    # A confirmed claim (job on the stream) is never taken over, however old.
    assert (await raw.get(claim_key(stale.key))).startswith(b"j:")
    assert await store.enqueue(stale) is EnqueueOutcome.ALREADY_PENDING
    assert (await store.queue_stats()).length == 1
    await raw.aclose()
    await store.close()


async def test_claim_left_by_a_dead_enqueue_expires_without_another_enqueue(
    redis_server_factory: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by bench/bench_redis_chaos.py: Redis killed between an enqueue's claim and its
    XADD left the key `pending` for the whole pending TTL (6 h) unless the same context was
    enqueued again; the unconfirmed claim now expires by itself."""
    monkeypatch.setattr("cache_store.redis_store._UNCONFIRMED_CLAIM_S", 1.0)
    server = redis_server_factory()
    store = _open(server)
    assert isinstance(store, RedisStore)
    job = make_job(14)
    run = store._run

    async def dies_before_the_xadd(name: str, keys: list[str], args: list[Any]) -> Any:
        if name == "xadd_bounded":
            raise StoreUnavailable("enqueue", "redis", "killed")
        return await run(name, keys, args)

    monkeypatch.setattr(store, "_run", dies_before_the_xadd)
    with pytest.raises(StoreUnavailable):
        await store.enqueue(job)
    monkeypatch.setattr(store, "_run", run)
    assert (await store.status(job.key)).state is KeyState.PENDING
    await asyncio.sleep(1.5)
    assert (await store.status(job.key)).state is KeyState.ABSENT
    # A confirmed claim keeps the pending TTL.
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
    raw = aioredis.Redis.from_url(server.url)
    assert await raw.pttl(claim_key(job.key)) > store.config.pending_ttl_s * 1000 - 5000
    await raw.aclose()
    await store.close()


def test_sentinel_and_cluster_urls_are_parsed() -> None:
    parsed = _parse_multi_host("redis+sentinel://user:p%40ss@h1:26379,h2:26380/mymaster/2")
    assert parsed.hosts == [("h1", 26379), ("h2", 26380)]
    assert parsed.path == ["mymaster", "2"]
    assert (parsed.username, parsed.password, parsed.tls) == ("user", "p@ss", False)
    tls = _parse_multi_host("rediss+cluster://h1:7000?ssl_ca_certs=/ca.pem")
    assert tls.tls and tls.hosts == [("h1", 7000)] and tls.query == {"ssl_ca_certs": "/ca.pem"}

    sentinel = redis_client("redis+sentinel://h1:26379/mymaster/1", op_timeout_s=0.5)
    assert isinstance(sentinel.connection_pool, SentinelConnectionPool)
    assert sentinel.connection_pool.service_name == "mymaster"
    cluster = redis_client("redis+cluster://h1:7000,h2:7001", op_timeout_s=0.5)
    assert isinstance(cluster, aioredis.RedisCluster)
    tls_client = redis_client("rediss://h1:6380/0", op_timeout_s=0.5)
    assert tls_client.connection_pool.connection_class.__name__ == "SSLConnection"


def test_bad_urls_are_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="unsupported store URL"):
        redis_client("http://localhost:6379", op_timeout_s=0.5)
    with pytest.raises(ValueError, match="names no master"):
        redis_client("redis+sentinel://h1:26379", op_timeout_s=0.5)
    with pytest.raises(ValueError, match="bad host:port"):
        redis_client("redis+cluster://h1:notaport", op_timeout_s=0.5)
    assert redact("redis://user:secret@h:6379/0") == "redis://user:***@h:6379/0"
    assert "secret" not in redact("redis+sentinel://:secret@h1:1,h2:2/m")


async def test_unavailable_error_message_says_what_to_do(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    server.stop()
    store = _open(server, op_timeout_s=0.3)
    with pytest.raises(StoreUnavailable) as excinfo:
        await store.status(make_job(1).key)
    assert excinfo.value.op == "status"
    assert "Check that Redis is running" in str(excinfo.value)
    await store.close()


async def test_store_works_through_sentinel(redis_sentinel: LocalSentinel) -> None:
    store = open_store(
        redis_sentinel.url, registry=CollectorRegistry(), **(FAST | {"poll_interval_s": 30.0})
    )
    worker = open_store(redis_sentinel.url, registry=CollectorRegistry(), **FAST)
    job = make_job(20)
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
    waiter = asyncio.create_task(store.wait_ready(job.key, timeout_s=10.0))
    [delivery] = await worker.claim_jobs("worker-1", block_s=1.0)
    await worker.publish(delivery, make_payload(job))
    # Woken through pub/sub on the master Sentinel named, not by the 30 s poll.
    assert (await asyncio.wait_for(waiter, 5.0)).state is KeyState.READY
    assert await store.get_payload(job.key, expectation(job)) is not None
    await worker.close()
    await store.close()


def _make_tls_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is not on PATH: apt-get install openssl")

    def run(command: str) -> None:
        subprocess.run(
            [openssl, *shlex.split(command)], cwd=directory, check=True, capture_output=True
        )

    run("req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 1 -subj /CN=test-ca")
    run("req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=127.0.0.1")
    (directory / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem "
        "-days 1 -extfile ext.cnf"
    )
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


async def test_store_works_over_tls(redis_server_factory: ServerFactory, tmp_path: Path) -> None:
    ca, cert, key = _make_tls_certificates(tmp_path)
    tls_port = free_port()
    redis_server_factory(
        extra_args=(
            "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
            "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
        )
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
    store = open_store(url, registry=CollectorRegistry(), **FAST)
    job = make_job(21)
    assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
    [delivery] = await store.claim_jobs("worker-1", block_s=0.5)
    await store.publish(delivery, make_payload(job))
    assert await store.get_payload(job.key, expectation(job)) is not None
    await store.close()
    # Without the CA the server's certificate is not trusted: a typed error, fast.
    untrusting = open_store(f"rediss://127.0.0.1:{tls_port}/0", registry=CollectorRegistry())
    await _fails_fast(untrusting.ping(), 1.5)
    await untrusting.close()


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """A single redis-server or the session's 3-node Cluster (flushed)."""
    if request.param == "redis":
        return request.getfixturevalue("redis_server_factory")().url
    cluster = request.getfixturevalue("redis_cluster")
    cluster.flush()
    return cluster.url


async def test_claim_whose_stream_entry_was_lost_is_released_by_the_next_enqueue(
    redis_url: str,
) -> None:
    store = open_store(redis_url, registry=CollectorRegistry(), **(FAST | {
        "visibility_timeout_s": 1.0}))  # fmt: skip
    raw = redis_client(redis_url, op_timeout_s=5.0)
    lost, kept = make_job(14), make_job(15)
    try:
        for job in (lost, kept):
            assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
        entry_id = (await raw.get(claim_key(lost.key))).decode().removeprefix("j:")
        # The entry vanishes (a failover of the stream's shard, XTRIM, DEL); its claim lives
        # on in another slot.
        assert await raw.xdel(JOB_STREAM, entry_id) == 1
        # Younger than the visibility timeout: still pending (it may be on its way).
        assert await store.enqueue(lost) is EnqueueOutcome.ALREADY_PENDING
        await asyncio.sleep(1.1)
        assert (await store.status(lost.key)).state is KeyState.PENDING
        assert await store.enqueue(lost) is EnqueueOutcome.ENQUEUED
        assert sample(store, "deliberate_store_orphaned_claims_total") == 1
        # A claim whose entry is on the stream is never released, however old.
        assert await store.enqueue(kept) is EnqueueOutcome.ALREADY_PENDING
        assert await store.enqueue(lost) is EnqueueOutcome.ALREADY_PENDING
        deliveries = await store.claim_jobs("worker-1", max_jobs=5, block_s=0.5)
        assert sorted(d.job.key for d in deliveries) == sorted([lost.key, kept.key])
        for delivery in deliveries:
            await store.publish(delivery, make_payload(delivery.job))
        assert (await store.status(lost.key)).state is KeyState.READY
        assert (await store.queue_stats()).length == 0
    finally:
        await raw.aclose()
        await store.close()
