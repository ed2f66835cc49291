"""Benchmark of cache_store: lookup and enqueue latency, payload size against the KV cache.

Runs each backend through the public interface (open_store), the way the server calls it:
get_payload includes the full verification (safetensors parse, metadata, sha256, finite
check). Redis is a private redis-server started on a free loopback port unless --redis-url
names one. Prints a Markdown table.

    python bench/bench_store.py --iterations 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from cache_store import (
    AugmentationStore,
    EnqueueOutcome,
    Job,
    PayloadExpectation,
    decode_payload,
    encode_payload,
    open_store,
)


@dataclass(frozen=True)
class Timing:
    name: str
    backend: str
    samples_s: list[float]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples_s)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    def row(self) -> str:
        us = 1e6
        return (
            f"| {self.name} | {self.backend} | {len(self.samples_s)} "
            f"| {self.quantile(0.5) * us:.0f} | {self.quantile(0.99) * us:.0f} "
            f"| {statistics.fmean(self.samples_s) * us:.0f} |"
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private_redis() -> Iterator[str]:
    """A throwaway redis-server on loopback (never the machine's shared instance)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not on PATH (apt-get install redis-server)")
    port = _free_port()
    with tempfile.TemporaryDirectory() as workdir:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", workdir]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    time.sleep(0.02)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            process.terminate()
            process.wait(timeout=10)


async def _time(
    call: Callable[[int], Awaitable[object]], iterations: int, warmup: int
) -> list[float]:
    for i in range(warmup):
        await call(-1 - i)
    samples = []
    for i in range(iterations):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    return samples


def _job(i: int, prefix_tokens: int) -> Job:
    return Job.create(
        tenant="bench",
        decoder_fp="bench-decoder",
        coprocessor_fp="bench-coprocessor",
        token_ids=[(i * 31 + t) % 49152 for t in range(prefix_tokens)],
    )


async def bench_backend(
    url: str | None, args: argparse.Namespace, payload_latents: torch.Tensor
) -> list[Timing]:
    name = "memory" if url is None else "redis (loopback)"
    store: AugmentationStore = open_store(
        url,
        registry=CollectorRegistry(),
        max_queue_length=10 * (args.iterations + args.warmup) + 10,
        op_timeout_s=5.0,
    )
    timings: list[Timing] = []
    try:
        job = _job(10**6, args.prefix_tokens)
        assert await store.enqueue(job) is EnqueueOutcome.ENQUEUED
        [delivery] = await store.claim_jobs("bench", block_s=1.0)
        data = encode_payload(
            payload_latents,
            key=job.key,
            decoder_fp=job.decoder_fp,
            coprocessor_fp=job.coprocessor_fp,
            prefix_len=job.prefix_len,
        )
        await store.publish(delivery, data)
        expected = PayloadExpectation.for_job(
            job, n_latents=args.n_latents, hidden=args.hidden, dtype=torch.bfloat16
        )
        hit = await store.get_payload(job.key, expected)
        assert hit is not None and hit.latents.shape == (args.n_latents, args.hidden)

        # Jobs (and so keys) are made before timing: key derivation is not the store's I/O.
        indices = range(-args.warmup, args.iterations)
        fresh = {i: _job(i, args.prefix_tokens) for i in indices}
        absent = {i: _job(2 * 10**6 + i, args.prefix_tokens) for i in indices}

        async def get(_: int) -> object:
            return await store.get_payload(job.key, expected)

        async def miss(i: int) -> object:
            return await store.get_payload(absent[i].key, PayloadExpectation.for_job(absent[i]))

        async def status(_: int) -> object:
            return await store.status(job.key)

        async def enqueue(i: int) -> object:
            return await store.enqueue(fresh[i])

        rows: list[tuple[str, Callable[[int], Awaitable[object]]]] = [
            ("get_payload hit (verified)", get),
            ("get_payload miss", miss),
            ("status", status),
            ("enqueue (new key)", enqueue),
            ("enqueue (duplicate: already pending)", enqueue),
        ]
        for label, call in rows:
            timings.append(Timing(label, name, await _time(call, args.iterations, args.warmup)))
    finally:
        await store.close()
    return timings


def decode_timing(data: bytes, expected: PayloadExpectation, iterations: int) -> Timing:
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        decode_payload(data, expected=expected)
        samples.append(time.perf_counter() - start)
    return Timing("decode_payload only (no I/O)", "-", samples)


def machine() -> str:
    model = "unknown"
    with Path("/proc/cpuinfo").open() as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = "n/a"
    if shutil.which("redis-server"):
        redis_version = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True
        ).stdout.split()[2]
    return (
        f"{platform.machine()}, {model}, nproc={os.cpu_count()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"redis-server {redis_version}"
    )


def sizes(args: argparse.Namespace, payload_bytes: int) -> str:
    # K and V, per layer, per KV head, per position, head_dim values of 2 bytes (bf16).
    kv_bytes = 2 * args.layers * args.kv_heads * args.head_dim * args.prefix_tokens * 2
    tensor_bytes = args.n_latents * args.hidden * 2
    return "\n".join(
        [
            f"| what ({args.prefix_tokens}-token prefix) | bytes |",
            "|---|---|",
            f"| KV cache (2 x {args.layers} layers x {args.kv_heads} KV heads x "
            f"{args.head_dim} head_dim x {args.prefix_tokens} tokens x 2 B) | {kv_bytes:,} |",
            f"| latents tensor ({args.n_latents} x {args.hidden} x 2 B) | {tensor_bytes:,} |",
            f"| payload as stored (safetensors + metadata) | {payload_bytes:,} |",
            f"| **KV cache / payload** | **{kv_bytes / payload_bytes:,.0f}x** |",
        ]
    )


async def main(args: argparse.Namespace) -> None:
    latents = torch.randn(args.n_latents, args.hidden, generator=torch.Generator().manual_seed(0))
    job = _job(0, args.prefix_tokens)
    data = encode_payload(
        latents,
        key=job.key,
        decoder_fp=job.decoder_fp,
        coprocessor_fp=job.coprocessor_fp,
        prefix_len=job.prefix_len,
    )
    expected = PayloadExpectation.for_job(job, n_latents=args.n_latents, hidden=args.hidden)
    timings = [decode_timing(data, expected, args.iterations)]
    if "memory" in args.backends:
        timings += await bench_backend(None, args, latents)
    if "redis" in args.backends:
        if args.redis_url:
            timings += await bench_backend(args.redis_url, args, latents)
        else:
            with private_redis() as url:
                timings += await bench_backend(url, args, latents)
    print(f"Machine: {machine()}\n")
    print(f"Payload {args.n_latents}x{args.hidden} bf16, prefix {args.prefix_tokens} tokens, ")
    print(f"{args.iterations} sequential calls per row after {args.warmup} warm-up calls.\n")
    print("| operation | backend | calls | p50 (us) | p99 (us) | mean (us) |")
    print("|---|---|---|---|---|---|")
    for timing in timings:
        print(timing.row())
    print()
    print(sizes(args, len(data)))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls before each row")
    parser.add_argument("--backends", default="memory,redis", help="comma-separated: memory, redis")
    parser.add_argument(
        "--redis-url",
        default=None,
        help="benchmark this Redis instead of a private loopback redis-server "
        "(it gets test keys and jobs: never point it at production)",
    )
    parser.add_argument("--n-latents", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=576, help="SmolLM2-135M hidden size")
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--layers", type=int, default=30, help="SmolLM2-135M layers")
    parser.add_argument("--kv-heads", type=int, default=3, help="SmolLM2-135M KV heads")
    parser.add_argument("--head-dim", type=int, default=64, help="SmolLM2-135M head_dim")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
