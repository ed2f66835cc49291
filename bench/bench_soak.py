"""Soak (issue 13, chaos suite): a real `deliberate serve` (vLLM, --redis-url) and a real
`deliberate worker` on a private redis-server, under --concurrency clients for --minutes on
loopback. Resident memory of the server (with its vLLM engine processes) and of the worker
is sampled after a warm-up round and then after every round; every answer must be 200.

    PYTHONPATH=. python bench/bench_soak.py [--minutes 10 --concurrency 32]

Exit status 1 if a request was not answered 200 or a process died. Figures:
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from bench.bench_redis_chaos import clients, make_contexts, start_serving_every_payload
from tests.fixtures.processes import ServiceProcess
from tests.fixtures.redis_server import RedisServer


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MB (/proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    total_kb, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        total_kb += next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )
    return round(total_kb / 1024, 1)


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    contexts = make_contexts(rng, args.contexts)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    (work / "redis").mkdir()
    redis_server = RedisServer(work / "redis")
    redis_server.start()
    worker: ServiceProcess | None = None
    server: ServiceProcess | None = None
    try:
        server, base, worker = await asyncio.to_thread(
            start_serving_every_payload, work, redis_server.url
        )
        rounds = argparse.Namespace(**{**vars(args), "requests": args.concurrency * 4})
        await clients(base, contexts, rounds, rng)  # warm-up: compile, first payloads
        samples = [(0.0, tree_rss_mb(server.process.pid), tree_rss_mb(worker.process.pid))]
        codes: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        failures: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < args.minutes * 60:
            round_codes, round_statuses, round_failures, _, _ = await clients(
                base, contexts, rounds, rng
            )
            codes.update(round_codes)
            statuses.update(round_statuses)
            failures += round_failures
            samples.append(
                (
                    round(time.monotonic() - started, 1),
                    tree_rss_mb(server.process.pid),
                    tree_rss_mb(worker.process.pid),
                )
            )
            elapsed, server_mb, worker_mb = samples[-1]
            answered = sum(codes.values())
            print(f"{elapsed:7.1f} s  rss server {server_mb} MB, worker {worker_mb} MB, "
                  f"{answered} answered", flush=True)  # fmt: skip
        return {
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "requests": sum(codes.values()),
            "http_codes": dict(codes),
            "failed": sum(n for c, n in codes.items() if c != "200"),
            "failures": failures[:10],
            "statuses": dict(statuses),
            "rss_server_mb_start_end": [samples[0][1], samples[-1][1]],
            "rss_worker_mb_start_end": [samples[0][2], samples[-1][2]],
            "rss_samples": samples,
            "server_alive": server.process.poll() is None,
            "worker_alive": worker.process.poll() is None,
        }
    finally:
        for process in (server, worker):
            if process is not None:
                process.stop()
        redis_server.stop()
        print(f"logs: {work}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--contexts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    alive = result["server_alive"] and result["worker_alive"]
    sys.exit(1 if result["failed"] or not alive else 0)


if __name__ == "__main__":
    main()
