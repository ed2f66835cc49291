"""The store under a misbehaving Redis: error replies, a hung server, a dead events
connection, hostile payloads. Every test runs its own redis-server (never the shared one).

Error replies are real: MISCONF from a failed background save, BUSY from a running script,
OOM from `maxmemory 1`, NOPERM from an ACL user, READONLY from a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from cache_store import StoreUnavailable, open_store
from cache_store.breaker import CircuitBreaker
from cache_store.checkpoint import DEFAULT_LATENT_NORM_MAX, CheckpointInfo
from cache_store.errors import CircuitOpen, StoreRefused
from cache_store.payload import NON_FINITE, NORM, PayloadExpectation
from cache_store.store import AugmentationStore
from tests.fixtures.redis_server import RedisServer, free_port
from tests.fixtures.store_backends import (
    FAST,
    HIDDEN,
    N_LATENTS,
    StoreHarness,
    make_job,
    make_payload,
    sample,
)

ServerFactory = Callable[..., RedisServer]


def _admin(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=10)


def _open(url: str, **overrides: Any) -> AugmentationStore:
    return open_store(url, registry=CollectorRegistry(), **(FAST | overrides))


# --- error replies ------------------------------------------------------------------------


@contextlib.contextmanager
def _misconf(server: RedisServer) -> Iterator[str]:
    """A background save that cannot write its file: Redis refuses writes with MISCONF
    (stop-writes-on-bgsave-error, the default) until a save succeeds."""
    admin = _admin(server)
    shutil.rmtree(server.workdir / "data")  # Redis' working directory
    admin.config_set("save", "3600 1")
    admin.bgsave()
    deadline = time.monotonic() + 10
    while "err" not in str(admin.info("persistence")["rdb_last_bgsave_status"]):
        assert time.monotonic() < deadline, "BGSAVE did not fail"
        time.sleep(0.05)
    try:
        yield server.url
    finally:
        admin.config_set("save", "")  # or Redis refuses to shut down without its save


@contextlib.contextmanager
def _busy(server: RedisServer) -> Iterator[str]:
    """A script that never ends: past busy-reply-threshold every other command gets BUSY."""
    admin = _admin(server)
    admin.config_set("busy-reply-threshold", "20")
    blocker = redis.Redis(port=server.port)

    def spin() -> None:
        with contextlib.suppress(redis.ResponseError):
            blocker.eval("while true do end", 0)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    time.sleep(0.3)
    try:
        yield server.url
    finally:
        killer = redis.Redis(port=server.port)
        deadline = time.monotonic() + 10
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(redis.ResponseError):
                killer.script_kill()
            thread.join(0.2)


@contextlib.contextmanager
def _oom(server: RedisServer) -> Iterator[str]:
    _admin(server).config_set("maxmemory", "1")
    yield server.url


@contextlib.contextmanager
def _noperm(server: RedisServer) -> Iterator[str]:
    """A user that may read but not run scripts (every write of the store is a script)."""
    _admin(server).acl_setuser(
        "reader", enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
        commands=["+@all", "-@scripting"],
    )  # fmt: skip
    yield f"redis://reader:secret@127.0.0.1:{server.port}/0"


@contextlib.contextmanager
def _readonly(server: RedisServer) -> Iterator[str]:
    admin = _admin(server)
    admin.replicaof("127.0.0.1", str(free_port()))  # a master that is not there
    try:
        yield server.url
    finally:
        admin.replicaof("NO", "ONE")


FAULTS = {"MISCONF": _misconf, "BUSY": _busy, "OOM": _oom, "NOPERM": _noperm, "READONLY": _readonly}


def _server(factory: ServerFactory) -> RedisServer:
    # Its own data directory, so the MISCONF case can take it away.
    probe = factory()
    data = probe.workdir / "data"
    data.mkdir()
    probe.stop()
    probe.extra_args += ["--dir", str(data)]
    probe.start()
    return probe


@pytest.mark.parametrize("code", list(FAULTS))
async def test_error_replies_become_store_unavailable_and_are_counted(
    redis_server_factory: ServerFactory, code: str
) -> None:
    server = _server(redis_server_factory)
    job = make_job(1)
    with FAULTS[code](server) as url:
        store = _open(url, breaker_failures=0)
        try:
            if code != "BUSY":
                assert await store.get_payload(job.key, _expect(job)) is None  # reads work
            with pytest.raises(StoreUnavailable) as refused:
                await store.enqueue(job)
            assert isinstance(refused.value, StoreRefused)
            assert refused.value.code == code
            assert sample(store, "deliberate_store_errors_total", op="enqueue") == 1
            if code in ("BUSY", "NOPERM"):  # the status script is refused too
                with pytest.raises(StoreRefused):
                    await store.status(job.key)
        finally:
            await store.close()


def _expect(job: Any, **overrides: Any) -> PayloadExpectation:
    return PayloadExpectation(
        key=job.key,
        decoder_fp=job.decoder_fp,
        coprocessor_fp=job.coprocessor_fp,
        prefix_len=job.prefix_len,
        n_latents=N_LATENTS,
        hidden=HIDDEN,
        dtype=None,
        **overrides,
    )


# --- circuit breaker and connections -------------------------------------------------------


def test_breaker_opens_after_n_failures_probes_once_after_the_cooldown() -> None:
    now = [0.0]
    breaker = CircuitBreaker(3, 2.0, clock=lambda: now[0])
    for _ in range(2):
        assert breaker.allow()
        breaker.failed()
    assert breaker.allow() and not breaker.is_open
    breaker.failed()
    assert breaker.is_open and not breaker.allow() and breaker.opened == 1
    now[0] = 2.5
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.failed()
    assert not breaker.allow() and breaker.opened == 2
    now[0] = 5.0
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.allow() and breaker.allow() and not breaker.is_open
    off = CircuitBreaker(0, 1.0)
    for _ in range(10):
        off.failed()
    assert off.allow()


def _connections_received(server: RedisServer) -> int:
    return int(_admin(server).info("stats")["total_connections_received"])


async def _lookups_against_a_hung_redis(
    server: RedisServer, store: AugmentationStore, n: int, *, concurrent: bool
) -> tuple[int, int]:
    """(connections Redis received during n timed-out lookups, failures seen)."""
    job = make_job(7)
    expected = _expect(job)
    assert await store.get_payload(job.key, expected) is None  # one warm connection
    before = _connections_received(server)
    server.pause()
    failures = 0

    async def lookup() -> None:
        nonlocal failures
        try:
            await store.get_payload(job.key, expected, timeout_s=0.01)
        except StoreUnavailable:
            failures += 1

    try:
        if concurrent:
            await asyncio.gather(*(lookup() for _ in range(n)))
        else:
            for _ in range(n):
                await lookup()
    finally:
        server.resume()
    await asyncio.sleep(0.5)  # Redis accepts the connections queued while it was frozen
    return _connections_received(server) - before - 1, failures  # -1: this INFO call


async def test_timed_out_lookups_against_a_hung_redis_open_few_connections(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    store = _open(server.url, max_connections=8, breaker_failures=5, breaker_cooldown_s=5.0)
    try:
        opened, failures = await _lookups_against_a_hung_redis(server, store, 200, concurrent=False)
        assert failures == 200
        # 5 timeouts open the breaker; the other 195 are skipped without a connection.
        assert opened <= 6, opened
        assert sample(store, "deliberate_store_breaker_skipped_total", op="get") >= 190
        assert sample(store, "deliberate_store_breaker_opened_total") == 1
    finally:
        await store.close()

    server_b = redis_server_factory()
    burst = _open(server_b.url, max_connections=8, breaker_failures=0)
    try:
        opened, failures = await _lookups_against_a_hung_redis(
            server_b, burst, 200, concurrent=True
        )
        assert failures == 200
        # At once, with no breaker: the pool lets 8 connect at a time, the rest wait and
        # time out (measured: 20; without the pool, one per lookup).
        assert opened <= 3 * 8, opened
    finally:
        await burst.close()


async def test_breaker_skips_a_down_store_then_recovers(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    store = _open(server.url, breaker_failures=3, breaker_cooldown_s=0.5, op_timeout_s=0.2)
    job = make_job(3)
    try:
        server.stop()
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await store.status(job.key)
        started = time.perf_counter()
        with pytest.raises(CircuitOpen):
            await store.status(job.key)
        assert time.perf_counter() - started < 0.05
        server.start()
        await asyncio.sleep(0.6)
        assert (await store.status(job.key)).state.value == "absent"
        assert not store.breaker.is_open
    finally:
        await store.close()


async def test_a_frozen_events_connection_is_detected_and_waiters_poll(
    redis_server_factory: ServerFactory,
) -> None:
    server = redis_server_factory()
    store = _open(server.url, events_health_check_s=0.3, op_timeout_s=0.3, breaker_failures=0)
    try:
        await store.wait_ready(make_job(4).key, 0.01)  # starts the listener
        deadline = time.monotonic() + 5
        while not store._notifications_active():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        server.pause()
        try:
            deadline = time.monotonic() + 5
            while store._notifications_active():
                assert time.monotonic() < deadline, "a frozen pub/sub connection went unnoticed"
                await asyncio.sleep(0.05)
        finally:
            server.resume()
        deadline = time.monotonic() + 10
        while not store._notifications_active():
            assert time.monotonic() < deadline, "the listener did not come back"
            await asyncio.sleep(0.05)
    finally:
        await store.close()


# --- payload magnitude ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_payloads_that_overflow_or_are_too_long_are_rejected_misses(
    redis_server_factory: ServerFactory, kind: str
) -> None:
    harness = StoreHarness(kind, redis_server_factory().url if kind == "redis" else None)
    store = harness.open()
    cases = {
        # Finite in fp32, Inf once cast to the decoder's bf16 or fp16.
        "overflow": (torch.full((N_LATENTS, HIDDEN), 3.4e38), torch.float16, NON_FINITE),
        "too long": (torch.full((N_LATENTS, HIDDEN), 10.0), torch.bfloat16, NORM),
    }
    for i, (latents, cast, reason) in enumerate(cases.values()):
        job = make_job(100 + i)
        data = make_payload(job, latents=latents, dtype=torch.float32)
        await harness.inject_payload(store, job.key, data)
        expected = _expect(job, cast_to=cast, max_latent_norm=DEFAULT_LATENT_NORM_MAX)
        assert await store.get_payload(job.key, expected) is None
        assert sample(store, "deliberate_store_payload_rejected_total", reason=reason) == 1
        # Without the new checks the same bytes pass: what the server used to accept.
        await harness.inject_payload(store, job.key, data)
        assert await store.get_payload(job.key, _expect(job)) is not None
    ok = make_job(200)
    await harness.inject_payload(store, ok.key, make_payload(ok))  # randn: norm ~8 for 64
    expected = _expect(ok, cast_to=torch.bfloat16, max_latent_norm=DEFAULT_LATENT_NORM_MAX)
    assert await store.get_payload(ok.key, expected) is not None
    await harness.close()


def test_checkpoint_manifest_bounds_the_latent_norm(tmp_path: Any) -> None:
    import json

    from coprocessor_worker.checkpoints import bundled_checkpoint_dir

    bundled = CheckpointInfo.read(bundled_checkpoint_dir())
    assert bundled.latent_norm_max == DEFAULT_LATENT_NORM_MAX
    copy = tmp_path / "ckpt"
    shutil.copytree(bundled_checkpoint_dir(), copy)
    manifest = json.loads((copy / "deliberate.json").read_text())
    (copy / "deliberate.json").write_text(json.dumps({**manifest, "latent_norm_max": 5.5}))
    assert CheckpointInfo.read(copy).latent_norm_max == 5.5
    (copy / "deliberate.json").write_text(json.dumps({**manifest, "latent_norm_max": -1}))
    with pytest.raises(ValueError, match="latent_norm_max"):
        CheckpointInfo.read(copy)


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_status_names_the_tenant_of_the_key_in_every_state(
    redis_server_factory: ServerFactory, kind: str
) -> None:
    harness = StoreHarness(kind, redis_server_factory().url if kind == "redis" else None)
    store = harness.open()
    try:
        ready, failed = make_job(301, tenant="tenant-r"), make_job(302, tenant="tenant-f")
        assert (await store.status(ready.key)).tenant is None  # absent
        for job in (ready, failed):
            await store.enqueue(job)
            assert (await store.status(job.key)).tenant == job.tenant  # pending, unclaimed
        deliveries = {d.job.key: d for d in await store.claim_jobs("w", 2, 0.5)}
        assert len(deliveries) == 2
        assert (await store.status(ready.key)).tenant == "tenant-r"  # pending, claimed
        await store.publish(deliveries[ready.key], make_payload(ready))
        await store.fail(deliveries[failed.key], "poison")
        assert (await store.status(ready.key)).state.value == "ready"
        assert (await store.status(ready.key)).tenant == "tenant-r"
        assert (await store.status(failed.key)).state.value == "failed"
        assert (await store.status(failed.key)).tenant == "tenant-f"
    finally:
        await harness.close()
