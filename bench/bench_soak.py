"""Soak (issue 13, chaos suite): a real `deliberate serve` (vLLM, --redis-url) and a real
`deliberate worker` on a private redis-server, under --concurrency clients for --minutes on
loopback. Resident memory of the server (with its vLLM engine processes) and of the worker
is sampled after a warm-up round and then after every round, per process (the API process and
vLLM's engine process apart); every answer must be 200.
`--server vllm` soaks `vllm serve` under the same load instead (context and prompt sent as
one prompt), to tell vLLM's own memory growth from ours.

    PYTHONPATH=. python bench/bench_soak.py [--minutes 10 --concurrency 32]
    PYTHONPATH=. python bench/bench_soak.py --server vllm

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


def tree_rss_by_process(pid: int) -> dict[str, float]:
    """Resident memory of `pid` and each of its descendants, in MB, keyed by process name
    (`/proc/N/comm`, e.g. vLLM's `VLLM::EngineCor`) and pid, so an engine process's growth is
    told from the API process's."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(parent, []).append(int(entry.name))
    rss, todo = {}, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            name = Path(f"/proc/{current}/comm").read_text().strip()
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        kb = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
        )
        rss[f"{name}:{current}"] = round(kb / 1024, 1)
    return rss


def start_servers(
    which: str, work: Path, redis_url: str, lookup_timeout_s: float | None
) -> tuple[dict[str, ServiceProcess], str]:
    """The processes under test (sampled for memory) and the URL the clients load: `vllm
    serve` alone, or `deliberate serve` and a worker on a private redis-server."""
    if which == "vllm":
        from bench.bench_server import start_vllm_serve
        from deliberate.models import resolve_decoder
        from deliberate.settings import Settings

        settings = Settings()
        flags = ["--enforce-eager", "--max-model-len", "2048", "--dtype", settings.compute_dtype()]
        vllm, base = start_vllm_serve(resolve_decoder(None, settings.cache_dir), flags, work)
        return {"server": vllm}, base
    flags = [] if lookup_timeout_s is None else ["--lookup-timeout-seconds", str(lookup_timeout_s)]
    server, base, worker = start_serving_every_payload(work, redis_url, *flags)
    return {"server": server, "worker": worker}, base


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    contexts = make_contexts(rng, args.contexts)
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    (work / "redis").mkdir()
    redis_server = RedisServer(work / "redis")
    if args.server == "deliberate":
        redis_server.start()
    processes: dict[str, ServiceProcess] = {}
    try:
        processes, base = await asyncio.to_thread(
            start_servers, args.server, work, redis_server.url, args.lookup_timeout_seconds
        )
        rounds = argparse.Namespace(**{**vars(args), "requests": args.concurrency * 4})
        one_prompt = args.server == "vllm"

        def rss() -> dict[str, dict[str, float]]:
            return {name: tree_rss_by_process(p.process.pid) for name, p in processes.items()}

        def total(sample: dict[str, float]) -> float:
            return round(sum(sample.values()), 1)

        await clients(base, contexts, rounds, rng, one_prompt=one_prompt)  # warm-up
        samples = [(0.0, rss())]
        codes: Counter[str] = Counter()
        statuses: Counter[str] = Counter()
        failures: list[str] = []
        started = time.monotonic()
        while time.monotonic() - started < args.minutes * 60:
            round_codes, round_statuses, round_failures, _, _ = await clients(
                base, contexts, rounds, rng, one_prompt=one_prompt
            )
            codes.update(round_codes)
            statuses.update(round_statuses)
            failures += round_failures
            samples.append((round(time.monotonic() - started, 1), rss()))
            print(f"{samples[-1][0]:7.1f} s  rss MB {samples[-1][1]}, "
                  f"{sum(codes.values())} answered", flush=True)  # fmt: skip
        return {
            "server": args.server,
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "requests": sum(codes.values()),
            "http_codes": dict(codes),
            "failed": sum(n for c, n in codes.items() if c != "200"),
            "failures": failures[:10],
            "statuses": dict(statuses),
            "rss_mb_start_end": {
                name: [total(samples[0][1][name]), total(samples[-1][1][name])]
                for name in processes
            },
            "rss_mb_start_end_per_process": {
                name: {
                    proc: [samples[0][1][name].get(proc), samples[-1][1][name].get(proc)]
                    for proc in samples[0][1][name] | samples[-1][1][name]
                }
                for name in processes
            },
            "rss_samples": samples,
            "alive": {name: p.process.poll() is None for name, p in processes.items()},
        }
    finally:
        for process in processes.values():
            process.stop()
        redis_server.stop()
        print(f"logs: {work}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--server",
        choices=("deliberate", "vllm"),
        default="deliberate",
        help="what to soak: deliberate serve + worker, or vllm serve (context + prompt as one "
        "prompt) to compare its memory",
    )
    parser.add_argument(
        "--lookup-timeout-seconds",
        type=float,
        default=None,
        help="deliberate serve's store lookup budget (default: its own, 10 ms); a larger one "
        "keeps hits coming on a loaded machine, to soak the prompt-embeds path",
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--contexts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["failed"] or not all(result["alive"].values()) else 0)


if __name__ == "__main__":
    main()
