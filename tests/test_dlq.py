"""`deliberate dlq`: the real command, as a process, against a real redis-server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from cache_store import JOB_STREAM, EnqueueOutcome, KeyState, open_store
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.store_backends import FAST, make_job

REPO = Path(__file__).resolve().parents[1]


def dlq(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deliberate", "dlq", *args, "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


async def test_dlq_lists_and_requeues_dead_letters(redis_server: RedisServer) -> None:
    url = redis_server.url
    store = open_store(url, registry=CollectorRegistry(), **FAST)
    oom, nan = make_job(1), make_job(2)
    raw = aioredis.Redis.from_url(url)
    try:
        for job in (oom, nan):
            assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
        await raw.xadd(JOB_STREAM, {"job": b'{"v": 1, "key": "not-a-job"'})
        deliveries = await store.claim_jobs("worker-1", max_jobs=5, block_s=0.5)
        reasons = {oom.key: "OutOfMemoryError: CUDA out of memory", nan.key: "latents NaN"}
        for delivery in deliveries:
            await store.fail(delivery, reasons[delivery.job.key])
        assert len(await store.dead_letters()) == 3  # two jobs and the malformed entry

        listed = dlq(url, "list")
        assert listed.returncode == 0, listed.stderr
        assert oom.key in listed.stdout and nan.key in listed.stdout
        assert "CUDA out of memory" in listed.stdout and "(not a job)" in listed.stdout
        assert "3 dead letter(s)" in listed.stdout

        one = dlq(url, "requeue", oom.key)
        assert one.returncode == 0, one.stdout + one.stderr
        assert f"{oom.key}: enqueued" in one.stdout
        assert (await store.status(oom.key)).state is KeyState.PENDING
        assert (await store.status(nan.key)).state is KeyState.FAILED  # only the one named
        remaining = [json.loads(line) for line in dlq(url, "list", "--json").stdout.splitlines()]
        assert {letter["key"] for letter in remaining} == {nan.key, None}

        unknown = dlq(url, "requeue", "f" * 64)
        assert unknown.returncode == 1 and "no dead letter" in unknown.stdout

        every = dlq(url, "requeue", "--all")
        # The malformed entry cannot be requeued: reported, and the exit status says so.
        assert every.returncode == 1, every.stdout + every.stderr
        assert f"{nan.key}: enqueued" in every.stdout and "not requeued" in every.stdout
        assert (await store.status(nan.key)).state is KeyState.PENDING
        [left] = await store.dead_letters()
        assert left.key is None
        # Both jobs are back on the queue as fresh jobs, first delivery.
        again = await store.claim_jobs("worker-2", max_jobs=5, block_s=0.5)
        assert sorted(d.job.key for d in again) == sorted([oom.key, nan.key])
        assert {d.deliveries for d in again} == {1}

        usage = subprocess.run(
            [sys.executable, "-m", "deliberate", "dlq", "list"],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env={k: v for k, v in os.environ.items()
                 if k != "DELIBERATE_REDIS_URL"},
        )  # fmt: skip
        assert usage.returncode != 0 and "--redis-url" in usage.stderr
    finally:
        await raw.aclose()
        await store.close()
