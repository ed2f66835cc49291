"""The augmentation worker's throughput against its floor, and enqueue-to-ready latency.

For each prefix length and batch size, the same prefixes go through:
  floor   `Coprocessor.latents` called directly on ready-made batches: the bare decoder
          forward plus the coprocessor forward, nothing else;
  memory  the worker loop (`AugmentationWorker.run`) over the in-memory store: claim, poison
          checks, batching, the same forwards in a thread, payload encoding, publish, ack;
  redis   the same loop over a real redis-server started for the run.
The floor is measured before and after the worker runs and averaged, so load drift on a
shared machine hits both sides alike. ratio = worker time / floor time (1.0 = no overhead).
Combinations whose estimated cost exceeds --max-combo-seconds are skipped and listed.

Then the time from enqueue to ready for one prefix with an idle worker (in process, blocked
in its claim), on both stores.

    python bench/bench_worker.py --coprocessor /tmp/ckpt-untrained

Prints Markdown tables (paste them into docs/benchmarks.md with the command and machine).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from prometheus_client import CollectorRegistry

from cache_store import AugmentationStore, Job, KeyState, open_store
from coprocessor_worker.coprocessor import Coprocessor
from coprocessor_worker.worker import (
    AugmentationWorker,
    WorkerLimits,
    WorkerMetrics,
)
from tests.fixtures.redis_server import RedisServer

VOCAB = 49152


@dataclass
class Row:
    length: int
    batch: int
    jobs: int
    floor_s: float
    memory_s: float
    memory_compute_s: float
    redis_s: float | None
    redis_compute_s: float | None

    def rate(self, seconds: float) -> float:
        return self.jobs / seconds


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        isa = "AVX-512" if "avx512f" in flags else ("AVX2, no AVX-512" if "avx2" in flags else "")
        if "avx512_bf16" in flags:
            isa += " + AVX512_BF16"
    except OSError:
        isa = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{os.cpu_count()} cores, {cpu} ({isa}), load average {load:.1f} at start"


def prefixes(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, VOCAB) for _ in range(length)] for _ in range(count)]


def time_floor(model: Coprocessor, batches: list[list[list[int]]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        model.latents(batch)
    return time.perf_counter() - started


def make_worker(
    store: AugmentationStore,
    model: Coprocessor,
    batch: int,
    length: int,
    name: str,
    block_s: float = 0.2,
    registry: CollectorRegistry | None = None,
) -> AugmentationWorker:
    limits = WorkerLimits(
        max_jobs=batch,
        max_tokens=batch * length,  # one claim = one batch = the floor's batch
        max_prefix_tokens=8192 - model.n_latents,
        vocab_size=VOCAB,
        block_s=block_s,
    )
    return AugmentationWorker(
        store,
        model,
        consumer=name,
        limits=limits,
        metrics=WorkerMetrics(registry or CollectorRegistry()),
    )


async def time_worker(
    store: AugmentationStore, model: Coprocessor, items: list[list[int]], batch: int, tag: str
) -> tuple[float, float]:
    """Enqueue every prefix (untimed), then time the worker loop until all are ready.
    Returns (wall time, time inside the forwards as the worker's own histogram saw it): their
    difference is the loop's overhead, measured in the same seconds, immune to load drift."""
    jobs = [
        Job.create(
            tenant=tag,
            decoder_fp=model.decoder_fingerprint,
            coprocessor_fp=model.fingerprint,
            token_ids=ids,
        )
        for ids in items
    ]
    for job in jobs:
        await store.enqueue(job)
    registry = CollectorRegistry()
    worker = make_worker(store, model, batch, len(items[0]), tag, registry=registry)
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(worker.run(stop))
    for job in jobs:
        status = await store.wait_ready(job.key, 3600)
        if status.state is not KeyState.READY:
            raise RuntimeError(f"{tag}: job ended {status}")
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    if worker.outcomes["done"] != len(jobs):
        raise RuntimeError(f"{tag}: worker did {dict(worker.outcomes)} for {len(jobs)} jobs")
    compute = registry.get_sample_value("deliberate_worker_compute_seconds_sum") or 0.0
    return elapsed, compute


async def latency(
    store: AugmentationStore, model: Coprocessor, length: int, repeats: int, tag: str
) -> list[float]:
    """Enqueue-to-ready of one prefix, one at a time, with the worker idle in its claim."""
    worker = make_worker(store, model, 8, length, tag, block_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(1.5)  # let the worker reach its blocking claim: "idle pool"
    samples = []
    for i, ids in enumerate(prefixes(repeats, length, seed=1000)):
        job = Job.create(
            tenant=f"{tag}-{i}",
            decoder_fp=model.decoder_fingerprint,
            coprocessor_fp=model.fingerprint,
            token_ids=ids,
        )
        started = time.perf_counter()
        await store.enqueue(job)
        status = await store.wait_ready(job.key, 600)
        samples.append(time.perf_counter() - started)
        if status.state is not KeyState.READY:
            raise RuntimeError(f"{tag}: job ended {status}")
        await asyncio.sleep(1.5)  # idle again before the next one
    stop.set()
    await task
    return samples


def start_redis() -> RedisServer:
    """Our own redis-server on a free port (never the machine's shared one)."""
    server = RedisServer(Path(tempfile.mkdtemp(prefix="bench-worker-redis-")))
    server.start()
    return server


async def run(args: argparse.Namespace, log: Callable[[str], None]) -> None:
    torch.set_num_threads(args.threads)
    decoder = args.decoder
    if decoder is None:
        from deliberate.models import prepare_bundled_decoder
        from deliberate.settings import Settings

        decoder = prepare_bundled_decoder(Settings().cache_dir)
    model = Coprocessor.load(args.coprocessor, decoder, dtype=torch.float32)
    log(f"# machine: {machine()}; torch threads {args.threads}; float32")
    model.latents(prefixes(1, 32, seed=0))  # warm-up: first-call allocations

    redis = None if args.no_redis else start_redis()
    redis_url = None if redis is None else redis.url
    rows: list[Row] = []
    skipped: list[str] = []
    per_prefix: dict[int, float] = {}
    try:
        for length in args.lengths:
            for batch in args.batch_sizes:
                passes = 3 if args.no_redis else 4  # floor, memory, redis, floor again
                unit = per_prefix.get(length)
                if unit is None and per_prefix:
                    # Not measured yet at this length: scale the longest measured one
                    # linearly (the forwards are dominated by per-token matmuls).
                    known = max(per_prefix)
                    unit = per_prefix[known] * length / known
                n_batches = args.batches
                if unit is not None:
                    while n_batches > 1 and unit * batch * n_batches * passes > args.max_combo:
                        n_batches -= 1
                    if unit * batch * n_batches * passes > args.max_combo:
                        skipped.append(
                            f"L={length} B={batch} (~{unit * batch * passes:.0f} s estimated)"
                        )
                        log(f"skip L={length} B={batch}")
                        continue
                items = prefixes(batch * n_batches, length, seed=length * 100 + batch)
                batches = [items[i : i + batch] for i in range(0, len(items), batch)]
                floor_a = time_floor(model, batches)
                per_prefix.setdefault(length, floor_a / len(items))
                memory_store = open_store(None, registry=CollectorRegistry())
                memory_s, memory_compute = await time_worker(
                    memory_store, model, items, batch, f"mem-{length}-{batch}"
                )
                await memory_store.close()
                redis_s = redis_compute = None
                if redis_url is not None:
                    redis_store = open_store(
                        redis_url, registry=CollectorRegistry(), op_timeout_s=10.0
                    )
                    redis_s, redis_compute = await time_worker(
                        redis_store, model, items, batch, f"redis-{length}-{batch}"
                    )
                    await redis_store.close()
                floor_b = time_floor(model, batches)
                row = Row(
                    length, batch, len(items), (floor_a + floor_b) / 2,
                    memory_s, memory_compute, redis_s, redis_compute,
                )  # fmt: skip
                rows.append(row)
                log(
                    f"L={length} B={batch} jobs={len(items)} floor {floor_a:.2f}/{floor_b:.2f} s "
                    f"memory {memory_s:.2f} s (forwards {memory_compute:.2f}) "
                    f"redis {redis_s} s (forwards {redis_compute})"
                )

        lat: dict[str, list[float]] = {}
        memory_store = open_store(None, registry=CollectorRegistry())
        lat["memory"] = await latency(memory_store, model, args.latency_length, 3, "lat-mem")
        await memory_store.close()
        if redis_url is not None:
            redis_store = open_store(redis_url, registry=CollectorRegistry(), op_timeout_s=10.0)
            lat["redis"] = await latency(redis_store, model, args.latency_length, 3, "lat-redis")
            await redis_store.close()
        floor_one = time_floor(model, [[p] for p in prefixes(3, args.latency_length, seed=7)]) / 3
    finally:
        if redis is not None:
            redis.stop()

    print()
    print(
        "| prefix tokens | batch | jobs | floor aug/s | worker (memory) aug/s | ratio | "
        "worker (redis) aug/s | ratio | loop overhead memory / redis, ms per job |"
    )
    print("|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        mem_overhead = 1000 * (r.memory_s - r.memory_compute_s) / r.jobs
        if r.redis_s is not None and r.redis_compute_s is not None:
            redis_cells = f"{r.rate(r.redis_s):.2f} | {r.redis_s / r.floor_s:.2f}x"
            redis_overhead = f"{1000 * (r.redis_s - r.redis_compute_s) / r.jobs:.0f}"
        else:
            redis_cells, redis_overhead = "- | -", "-"
        print(
            f"| {r.length} | {r.batch} | {r.jobs} | {r.rate(r.floor_s):.2f} | "
            f"{r.rate(r.memory_s):.2f} | {r.memory_s / r.floor_s:.2f}x | {redis_cells} | "
            f"{mem_overhead:.0f} / {redis_overhead} |"
        )
    if skipped:
        print(f"\nSkipped (over --max-combo-seconds {args.max_combo:.0f}): " + "; ".join(skipped))
    print(f"\nEnqueue to ready, one {args.latency_length}-token prefix, idle worker "
          f"(floor: one forward alone {floor_one:.2f} s):\n")  # fmt: skip
    print("| store | median s | samples s | overhead over the forward s |")
    print("|---|---|---|---|")
    for store_name, samples in lat.items():
        median = statistics.median(samples)
        print(
            f"| {store_name} | {median:.2f} | {', '.join(f'{s:.2f}' for s in samples)} | "
            f"{median - floor_one:+.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--coprocessor",
        type=Path,
        default=os.environ.get("DELIBERATE_COPROCESSOR"),
        required=os.environ.get("DELIBERATE_COPROCESSOR") is None,
        help="coprocessor checkpoint folder (env DELIBERATE_COPROCESSOR)",
    )
    parser.add_argument(
        "--decoder", type=Path, default=None, help="decoder folder (default: the bundled one)"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--batches", type=int, default=2, help="batches per measurement")
    parser.add_argument(
        "--max-combo-seconds",
        dest="max_combo",
        type=float,
        default=200.0,
        help="skip a length/batch combination estimated to take longer (all passes)",
    )
    parser.add_argument("--latency-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-redis", action="store_true", help="skip the redis-server runs")
    args = parser.parse_args()
    asyncio.run(run(args, lambda line: print(line, file=sys.stderr, flush=True)))


if __name__ == "__main__":
    main()
