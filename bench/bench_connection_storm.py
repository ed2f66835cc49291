"""Connections a store opens while Redis is frozen (SIGSTOP): 200 timed-out lookups of one
key, one after another and all at once, counted by Redis (total_connections_received).
Also what escapes store.enqueue under MISCONF. Private redis-servers on loopback only.
Figures: docs/reliability.md."""

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time

import redis
from prometheus_client import CollectorRegistry

from cache_store import Job, PayloadExpectation, open_store


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start(d):
    port = free_port()
    p = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            d,
        ],
        stdout=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            break
        except Exception:
            time.sleep(0.05)
    return p, port


job = Job.create(tenant="t", decoder_fp="d", coprocessor_fp="c", token_ids=list(range(40)))
exp = PayloadExpectation(key=job.key, decoder_fp="d", coprocessor_fp="c", prefix_len=40, dtype=None)


async def storm(concurrent):
    d = tempfile.mkdtemp()
    os.makedirs(d, exist_ok=True)
    p, port = start(d)
    store = open_store(f"redis://127.0.0.1:{port}/0", registry=CollectorRegistry())
    await store.get_payload(job.key, exp)
    before = int(redis.Redis(port=port).info("stats")["total_connections_received"])
    p.send_signal(19)

    async def one():
        with contextlib.suppress(Exception):
            await store.get_payload(job.key, exp, timeout_s=0.01)

    if concurrent:
        await asyncio.gather(*(one() for _ in range(200)))
    else:
        for _ in range(200):
            await one()
    p.send_signal(18)
    await asyncio.sleep(0.5)
    after = int(redis.Redis(port=port).info("stats")["total_connections_received"])
    await store.close()
    p.terminate()
    p.wait()
    return after - before - 1


async def misconf():
    d = tempfile.mkdtemp()
    os.makedirs(d + "/data")
    p, port = start(d + "/data")
    a = redis.Redis(port=port)
    shutil.rmtree(d + "/data")
    a.config_set("save", "3600 1")
    a.bgsave()
    time.sleep(1)
    store = open_store(f"redis://127.0.0.1:{port}/0", registry=CollectorRegistry())
    try:
        await store.enqueue(job)
        r = "no error"
    except Exception as e:
        r = type(e).__module__ + "." + type(e).__name__
    a.config_set("save", "")
    await store.close()
    p.terminate()
    p.wait()
    return r


async def main():
    print("MISCONF enqueue raises:", await misconf())
    print("200 sequential timed-out lookups opened connections:", await storm(False))
    print("200 concurrent timed-out lookups opened connections:", await storm(True))


asyncio.run(main())
