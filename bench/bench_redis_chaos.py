"""Redis kill and restart loop under load (issue 13, chaos suite): a real `deliberate serve`
(vLLM, --redis-url) and a real `deliberate worker` on a private redis-server (appendonly,
fsync always) on loopback, which is killed with SIGKILL and restarted every few seconds while
a bounded client loop sends completions with contexts (a few dozen distinct ones, so repeats
can hit).

    failed            requests not answered 200 (or not answered at all)
    statuses          the augmentation status of every answer (hit, miss-enqueued,
                      store-unavailable, ...): the store being down may only make a miss
    pending at bound  keys still `pending` (GET /v1/augmentations/{key}) --pending-bound
                      seconds after Redis is back for good

Bounded: at most --kills kills and --max-minutes overall. Exit status 1 if a request failed,
a status lookup answered 5xx or a key stayed pending. Figures: docs/reliability.md.

    PYTHONPATH=. python bench/bench_redis_chaos.py [--requests 1000 --contexts 40]
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

import httpx

from tests.fixtures.processes import (
    ServiceProcess,
    spawn_worker,
    start_server,
    start_server_and_worker,
)
from tests.fixtures.redis_server import RedisServer

WORDS = [
    *("queue", "latent", "store", "worker", "batch", "claim", "stream", "tenant", "payload"),
    *("decoder", "context", "prefix", "replica", "shard", "cluster", "timeout", "budget"),
    *("cache", "lookup", "publish", "reclaim", "heartbeat", "engine", "token", "prompt"),
    *("answer", "river", "mountain", "harbor", "lantern", "meadow", "orchard", "copper"),
]


def make_contexts(rng: random.Random, n: int) -> list[str]:
    """Distinct contexts, each well over min_context_tokens (32) tokens."""
    return [
        f"Document {i}. " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
        for i in range(n)
    ]


def start_serving_every_payload(
    work: Path, redis_url: str, *server_flags: str
) -> tuple[ServiceProcess, str, ServiceProcess]:
    """A server (with `server_flags`) and a worker on `redis_url` with the value check off, so
    every payload is served and repeats hit and read payloads; the bundled coprocessor then
    counts as unvalidated, so the server is told to allow it."""
    return start_server_and_worker(
        work,
        redis_url,
        "--no-value-check",
        server_flags=("--allow-unvalidated-coprocessor", *server_flags),
    )


async def chaos(
    server: RedisServer, args: argparse.Namespace, rng: random.Random, done: asyncio.Event
) -> list[tuple[float, float]]:
    """Kill Redis (SIGKILL) and restart it on the same port and directory until `done`."""
    log: list[tuple[float, float]] = []
    t0 = time.monotonic()
    while len(log) < args.kills and not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), rng.uniform(*args.kill_every))
            break
        except TimeoutError:
            pass
        killed_at = time.monotonic()
        server.kill()
        await asyncio.sleep(rng.uniform(*args.down))
        await asyncio.to_thread(server.start)
        log.append((round(killed_at - t0, 1), round(time.monotonic() - killed_at, 2)))
        print(f"{killed_at - t0:6.1f} s  killed Redis, back after {log[-1][1]} s", flush=True)
    return log


async def clients(
    base: str,
    contexts: list[str],
    args: argparse.Namespace,
    rng: random.Random,
    *,
    one_prompt: bool = False,
) -> tuple[Counter[str], Counter[str], list[str], set[str], list[float]]:
    """`args.requests` completions over `args.concurrency` clients, each for a random one of
    `contexts`; `one_prompt` sends context and prompt as one prompt (for `vllm serve`)."""
    codes: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    failures: list[str] = []
    keys: set[str] = set()
    latencies: list[float] = []
    picks = [rng.randrange(len(contexts)) for _ in range(args.requests)]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in picks:
        queue.put_nowait(i)

    async def one(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            context, prompt = contexts[i], "Summarize the document in one word:"
            text = (
                {"prompt": context + prompt}
                if one_prompt
                else {"context": context, "prompt": prompt}
            )
            body = {**text, "max_tokens": args.max_tokens, "temperature": 0}
            started = time.monotonic()
            try:
                response = await http.post(f"{base}/v1/completions", json=body)
            except httpx.HTTPError as exc:
                codes["exception"] += 1
                failures.append(f"context {i}: {type(exc).__name__}: {exc}")
                continue
            latencies.append(time.monotonic() - started)
            codes[str(response.status_code)] += 1
            if response.status_code != 200:
                failures.append(f"context {i}: {response.status_code} {response.text[:300]}")
                continue
            augmentation = response.json().get("augmentation") or {}
            statuses[augmentation.get("status", "(none)")] += 1
            if augmentation.get("key"):
                keys.add(augmentation["key"])

    async with httpx.AsyncClient(timeout=args.request_timeout) as http:
        await asyncio.gather(*(one(http) for _ in range(args.concurrency)))
    return codes, statuses, failures, keys, latencies


async def settle(
    base: str, keys: set[str], bound_s: float
) -> tuple[dict[str, str], float | None, Counter[str]]:
    """Poll every key's status until none is pending or `bound_s` has passed."""
    states: dict[str, str] = {}
    lookups: Counter[str] = Counter()
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30) as http:
        while True:
            for key in sorted(keys):
                if states.get(key) not in (None, "pending"):
                    continue
                response = await http.get(f"{base}/v1/augmentations/{key}")
                lookups[str(response.status_code)] += 1
                if response.status_code == 200:
                    states[key] = response.json()["state"]
                elif response.status_code == 404:
                    states[key] = "absent"
                else:
                    states[key] = f"http-{response.status_code}"
            if "pending" not in states.values():
                return states, round(time.monotonic() - started, 1), lookups
            if time.monotonic() - started > bound_s:
                return states, None, lookups
            await asyncio.sleep(1.0)


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    contexts = make_contexts(rng, args.contexts)
    work = Path(tempfile.mkdtemp(prefix="redis-chaos-"))
    (work / "redis").mkdir()
    redis = RedisServer(work / "redis", appendonly=True)
    redis.start()
    value = () if args.value_check else ("--no-value-check",)
    # With the value check off the bundled coprocessor counts as unvalidated: allow it, else
    # every answer is `skipped-unvalidated` and the store is never asked.
    serve_value = value + (() if args.value_check else ("--allow-unvalidated-coprocessor",))
    store_flags = ("--redis-url", redis.url,
                   "--visibility-timeout-seconds", str(args.visibility), *serve_value)  # fmt: skip
    worker: ServiceProcess | None = None
    server: ServiceProcess | None = None
    try:
        worker = spawn_worker(work, redis.url, "--torch-threads", "1",
                              "--visibility-timeout-seconds", str(args.visibility),
                              *value)  # fmt: skip
        server, base = await asyncio.to_thread(start_server, work, *store_flags)
        worker.wait_ready(f"{worker.health_url}/ready", timeout_s=600)  # type: ignore[attr-defined]
        print(f"server {base} and worker ready; {args.requests} requests", flush=True)
        done = asyncio.Event()
        started = time.monotonic()
        chaos_task = asyncio.create_task(chaos(redis, args, rng, done))
        try:
            codes, statuses, failures, keys, latencies = await asyncio.wait_for(
                clients(base, contexts, args, rng), args.max_minutes * 60
            )
        finally:
            done.set()
            kill_log = await chaos_task
        load_seconds = time.monotonic() - started
        if redis.process is None:
            redis.start()
        states, settled_s, lookups = await settle(base, keys, args.pending_bound)
        latencies.sort()

        def pct(q: float) -> float | None:
            return round(latencies[int(q * (len(latencies) - 1))], 2) if latencies else None

        return {
            "requests": args.requests,
            "contexts": args.contexts,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "value_check": args.value_check,
            "kills": len(kill_log),
            "down_seconds_total": round(sum(d for _, d in kill_log), 1),
            "http_codes": dict(codes),
            "failed": sum(n for c, n in codes.items() if c != "200"),
            "failures": failures[:10],
            "statuses": dict(statuses),
            "keys_seen": len(keys),
            "final_states": dict(Counter(states.values())),
            "pending_at_bound": sum(1 for s in states.values() if s == "pending"),
            "seconds_until_none_pending": settled_s,
            "status_lookup_codes": dict(lookups),
            "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99),
            "latency_max_s": pct(1.0),
            "load_seconds": round(load_seconds, 1),
            "server_alive": server.process.poll() is None,
            "worker_alive": worker.process.poll() is None,
            "kill_log": kill_log,
        }
    finally:
        for process in (server, worker):
            if process is not None:
                process.stop()
        redis.stop()
        print(f"logs: {work}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--contexts", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(2.0, 5.0))
    parser.add_argument("--down", type=float, nargs=2, default=(0.2, 2.0))
    parser.add_argument("--visibility", type=float, default=10.0)
    parser.add_argument("--pending-bound", type=float, default=120.0)
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--value-check",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="off: serve every payload (more hits; on, many are answered `declined`)",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    bad = (
        result["failed"]
        or result["pending_at_bound"]
        or any(not c.startswith("2") and c != "404" for c in result["status_lookup_codes"])
        or not result["server_alive"]
        or not result["worker_alive"]
        or not result["keys_seen"]  # nothing reached the store: the run proved nothing
    )
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
