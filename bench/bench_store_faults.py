"""Store faults under load (issue 13, chaos suite): latency injected through a TCP proxy, and
error replies from Redis itself, while clients keep sending completions.

A real `deliberate serve` (vLLM, --redis-url) and a real `deliberate worker` reach a private
redis-server through a loopback proxy that can delay every chunk it forwards. The load runs
in phases of --requests each, one fault per phase:

    clean          no fault
    delay-Nms      the proxy delays each chunk by N ms, each way (--delays; below and above
                   the server's 10 ms lookup budget: a lookup is a round trip, two delays)
    oom            `CONFIG SET maxmemory 1` (noeviction): every write answers OOM
    readonly       `REPLICAOF` an address nothing listens on: every write answers READONLY
    clean-again    the faults removed

Per phase: HTTP codes (every answer must be 200), augmentation statuses, latency p50 / p99.
Exit status 1 if a request was not answered 200 or the server or worker died. Figures:
docs/reliability.md.

    PYTHONPATH=. python bench/bench_store_faults.py [--requests 100 --delays 2 20 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis

from bench.bench_redis_chaos import clients, make_contexts, start_serving_every_payload
from tests.fixtures.processes import ServiceProcess
from tests.fixtures.redis_server import RedisServer, free_port


class FaultProxy:
    """Forwards loopback TCP to `target_port`, delaying each chunk by `delay_s` each way, or
    holding every chunk while `held` (connections stay open, nothing answers: half-open, as
    a hung or partitioned Redis looks). Counts connections: opened in all, open at most."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.delay_s = 0.0
        self.released = asyncio.Event()
        self.released.set()
        self.opened = 0
        self.open = 0
        self.max_open = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        self.released.set()
        if self._server is not None:
            self._server.close()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter):
        try:
            upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        self.opened += 1
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        # Connections still open when the run ends are cancelled: that is their end.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(self._pipe(client_r, upstream_w), self._pipe(upstream_r, client_w))
        self.open -= 1

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                await self.released.wait()
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()


class RedisFaults:
    """Error replies from Redis itself, one kind at a time, and back to normal."""

    def __init__(self, port: int, workdir: Path) -> None:
        self.admin = redis.Redis(port=port)
        self.port = port
        self.workdir = workdir
        self._busy: threading.Thread | None = None

    def start(self, kind: str) -> None:
        if kind == "oom":  # every write: OOM command not allowed when used memory > maxmemory
            self.admin.config_set("maxmemory", "1")
        elif kind == "readonly":  # a replica of an address nothing listens on: READONLY
            self.admin.execute_command("REPLICAOF", "127.0.0.1", free_port())
        elif kind == "noperm":  # the connection's user may not write: NOPERM
            self.admin.execute_command("ACL", "SETUSER", "default", "-@write")
        elif kind == "busy":  # a script that never ends: every other command answers BUSY
            self.admin.config_set("busy-reply-threshold", "50")
            self._busy = threading.Thread(target=self._endless_script, daemon=True)
            self._busy.start()
            time.sleep(0.2)
        elif kind == "misconf":  # a failed background save stops writes: MISCONF
            self.admin.config_set("save", "3600 1")  # writes stop only where saves are due
            self.admin.config_set("dir", "/proc")  # nothing can be created there
            self.admin.bgsave()
            self._wait_bgsave("err")

    def stop(self, kind: str) -> None:
        if kind == "oom":
            self.admin.config_set("maxmemory", "0")
        elif kind == "readonly":
            self.admin.execute_command("REPLICAOF", "NO", "ONE")
        elif kind == "noperm":
            self.admin.execute_command("ACL", "SETUSER", "default", "+@all")
        elif kind == "busy":
            self.admin.execute_command("SCRIPT", "KILL")
            assert self._busy is not None
            self._busy.join(timeout=10)
        elif kind == "misconf":
            self.admin.config_set("dir", str(self.workdir))
            self.admin.bgsave()  # a save that succeeds lifts the stop
            self._wait_bgsave("ok")
            self.admin.config_set("save", "")

    def _endless_script(self) -> None:
        with contextlib.suppress(redis.ResponseError):  # "killed by user" ends it
            redis.Redis(port=self.port).eval("while true do end", 0)

    def _wait_bgsave(self, status: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = self.admin.info("persistence")
            if not info["rdb_bgsave_in_progress"] and info["rdb_last_bgsave_status"] == status:
                return
            time.sleep(0.1)
        raise RuntimeError(f"background save did not end with status {status!r}")


REDIS_FAULTS = ("oom", "readonly", "noperm", "busy", "misconf")


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    contexts = make_contexts(rng, args.contexts)
    work = Path(tempfile.mkdtemp(prefix="store-faults-"))
    (work / "redis").mkdir()
    redis_server = RedisServer(
        work / "redis",
        # CONFIG SET dir (the MISCONF fault) is a protected setting in Redis 7.
        extra_args=("--maxmemory-policy", "noeviction", "--enable-protected-configs", "yes"),
    )
    redis_server.start()
    faults = RedisFaults(redis_server.port, work / "redis")
    proxy = FaultProxy(redis_server.port)
    await proxy.start()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    worker: ServiceProcess | None = None
    server: ServiceProcess | None = None
    phases = ["clean", *(f"delay-{d:g}ms" for d in args.delays), "hold", *REDIS_FAULTS]
    phases.append("clean-again")
    results: dict[str, object] = {}
    try:
        server, base, worker = await asyncio.to_thread(start_serving_every_payload, work, url)
        for phase in phases:
            if phase.startswith("delay-"):
                proxy.delay_s = float(phase.removeprefix("delay-").removesuffix("ms")) / 1000
            elif phase == "hold":
                proxy.released.clear()
            elif phase in REDIS_FAULTS:
                faults.start(phase)
            opened = proxy.opened
            proxy.max_open = proxy.open
            codes, statuses, failures, _, latencies = await clients(base, contexts, args, rng)
            proxy.delay_s = 0.0
            proxy.released.set()
            if phase in REDIS_FAULTS:
                faults.stop(phase)
            latencies.sort()
            results[phase] = {
                "http_codes": dict(codes),
                "failures": failures[:5],
                "statuses": dict(Counter(statuses)),
                "latency_p50_s": round(latencies[len(latencies) // 2], 3) if latencies else None,
                "latency_p99_s": round(latencies[int(0.99 * (len(latencies) - 1))], 3)
                if latencies
                else None,
                "connections_opened": proxy.opened - opened,
                "connections_open_max": proxy.max_open,
            }
            print(phase, json.dumps(results[phase]), flush=True)
        results["server_alive"] = server.process.poll() is None
        results["worker_alive"] = worker.process.poll() is None
        return results
    finally:
        for process in (server, worker):
            if process is not None:
                process.stop()
        await proxy.stop()
        redis_server.stop()
        print(f"logs: {work}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help="requests per phase")
    parser.add_argument("--contexts", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--delays", type=float, nargs="*", default=[2.0, 20.0, 200.0], help="ms")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    failed = any(
        isinstance(r, dict) and set(r.get("http_codes", {})) - {"200"} for r in result.values()
    )
    sys.exit(1 if failed or not (result["server_alive"] and result["worker_alive"]) else 0)


if __name__ == "__main__":
    main()
