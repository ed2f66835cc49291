"""Worker SIGKILL loop near max deliveries, with several workers and slow batches (issue 13,
chaos suite): real `deliberate worker` processes (the bundled decoder and coprocessor) on a
private redis-server on loopback; one worker is killed with SIGKILL every few seconds and
restarted under the same consumer name, with a visibility timeout shorter than a batch and
max_deliveries 2.

Before each kill the jobs the victim is computing (its pending entries idle less than the
visibility timeout) are recorded, so every dead letter can be judged: a job may rightly be
dead-lettered only if it was in a killed worker's hands at least max_deliveries times.

    lost              jobs neither ready, declined nor failed at the end
    falsely failed    jobs failed though killed fewer than max_deliveries times
    false dead letters dead letters of such jobs
    extra deliveries  deliveries beyond 1 + the kills that held the job (reclaims of jobs
                      whose worker was alive: what claim renewal prevents)

Bounded: at most --kills kills and --max-minutes overall. Figures: docs/reliability.md.

    PYTHONPATH=. python bench/bench_worker_chaos.py [--jobs 30 --workers 3 --kills 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import redis as redis_sync
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from cache_store import CONSUMER_GROUP, JOB_STREAM, Job, KeyState, open_store
from cache_store.fingerprint import checkpoint_fingerprint, decoder_fingerprint
from coprocessor_worker.checkpoints import bundled_checkpoint_dir
from deliberate.models import prepare_bundled_decoder
from deliberate.settings import Settings
from tests.fixtures.processes import ServiceProcess, spawn_worker
from tests.fixtures.redis_server import RedisServer

VOCAB = 49152


def held_keys(client: redis_sync.Redis, consumer: str, visibility_ms: int) -> set[str]:
    """Keys of the entries `consumer` is computing now (handed-back ones are idle longer)."""
    try:
        entries = client.xpending_range(JOB_STREAM, CONSUMER_GROUP, "-", "+", 1000, consumer)
    except redis_sync.ResponseError:
        return set()
    keys = set()
    for entry in entries:
        if entry["time_since_delivered"] >= visibility_ms:
            continue
        found = client.xrange(JOB_STREAM, entry["message_id"], entry["message_id"])
        if found:
            keys.add(json.loads(found[0][1][b"job"])["key"])
    return keys


def start(log_dir: Path, url: str, name: str, args: argparse.Namespace) -> ServiceProcess:
    return spawn_worker(
        log_dir,
        url,
        "--worker-consumer", name,
        "--torch-threads", "1",
        "--max-model-len", "1024",
        "--visibility-timeout-seconds", str(args.visibility),
        "--max-deliveries", str(args.max_deliveries),
        "--worker-batch-max-jobs", str(args.batch_jobs),
        "--worker-claim-block-seconds", "0.5",
    )  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    decoder = prepare_bundled_decoder(Settings().cache_dir)
    dfp, cfp = decoder_fingerprint(decoder), checkpoint_fingerprint(bundled_checkpoint_dir())
    jobs = [
        Job.create(tenant="chaos", decoder_fp=dfp, coprocessor_fp=cfp,
                   token_ids=[rng.randrange(3, VOCAB) for _ in range(rng.randint(*args.length))])
        for _ in range(args.jobs)
    ]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    server = RedisServer(work)
    server.start()
    client = redis_sync.Redis.from_url(server.url)
    store = open_store(
        server.url,
        registry=CollectorRegistry(),
        op_timeout_s=5.0,
        visibility_timeout_s=args.visibility,
        max_deliveries=args.max_deliveries,
    )
    names = [f"chaos-{i}" for i in range(args.workers)]
    workers = {name: start(work, server.url, name, args) for name in names}
    kills: Counter[str] = Counter()
    kill_log: list[tuple[float, str, int]] = []
    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    try:
        for worker in workers.values():
            worker.wait_ready(f"{worker.health_url}/ready", timeout_s=600)  # type: ignore[attr-defined]
        for job in jobs:
            await store.enqueue(job)
        t0 = time.monotonic()
        keys = [j.key for j in jobs]

        async def states() -> Counter[str]:
            return Counter([(await store.status(k)).state.value for k in keys])

        n_kills = 0
        while n_kills < args.kills and time.monotonic() < deadline:
            await asyncio.sleep(rng.uniform(*args.kill_every))
            if (await states())[KeyState.PENDING.value] == 0:
                break
            name = rng.choice(names)
            if workers[name].process.poll() is not None:
                continue
            held = held_keys(client, name, int(args.visibility * 1000))
            workers[name].signal(signal.SIGKILL)
            workers[name].process.wait(30)
            n_kills += 1
            kills.update(held)
            kill_log.append((round(time.monotonic() - t0, 1), name, len(held)))
            print(f"{time.monotonic() - t0:6.1f} s  killed {name} holding {len(held)} jobs",
                  flush=True)  # fmt: skip
            workers[name] = start(work, server.url, name, args)
        while time.monotonic() < deadline and (await states())[KeyState.PENDING.value]:
            await asyncio.sleep(1.0)
        elapsed = time.monotonic() - t0
        final: dict[str, KeyState] = {}
        attempts: dict[str, int] = {}
        for key in keys:
            status = await store.status(key)
            final[key], attempts[key] = status.state, status.attempts
        letters = await store.dead_letters(1000)
        legit = {k for k in keys if kills[k] >= args.max_deliveries}
        finished = {KeyState.READY, KeyState.DECLINED, KeyState.FAILED}
        extra = sum(max(0, attempts[k] - 1 - kills[k]) for k in keys
                    if final[k] in (KeyState.READY, KeyState.DECLINED))  # fmt: skip
        reclaimed, batches, batch_seconds, slow_batches = 0, 0, 0.0, 0
        for worker in workers.values():
            text = worker.log_path.read_text(errors="replace")
            reclaimed += text.count("taken over meanwhile")
            if worker.process.poll() is not None:
                continue
            metrics = httpx.get(f"{worker.health_url}/metrics", timeout=10).text  # type: ignore[attr-defined]
            for family in text_string_to_metric_families(metrics):
                for sample in family.samples:
                    if sample.name == "deliberate_worker_compute_seconds_count":
                        batches += int(sample.value)
                    elif sample.name == "deliberate_worker_compute_seconds_sum":
                        batch_seconds += sample.value
                    elif (sample.name == "deliberate_worker_compute_seconds_bucket"
                          and sample.labels["le"] == "2.5"):  # fmt: skip
                        slow_batches -= int(sample.value)
        slow_batches += batches
        result = {
            "jobs": len(keys),
            "workers": args.workers,
            "kills": n_kills,
            "jobs_held_by_killed_workers": sum(1 for k in keys if kills[k]),
            "max_kills_of_one_job": max(kills.values(), default=0),
            "rightly_dead_lettered_possible": len(legit),
            "ready": sum(1 for s in final.values() if s is KeyState.READY),
            "declined": sum(1 for s in final.values() if s is KeyState.DECLINED),
            "failed": sum(1 for s in final.values() if s is KeyState.FAILED),
            "lost": sum(1 for s in final.values() if s not in finished),
            "falsely_failed": sum(
                1 for k, s in final.items() if s is KeyState.FAILED and k not in legit
            ),
            "dead_letters": len(letters),
            "false_dead_letters": sum(1 for letter in letters if letter.key not in legit),
            "extra_deliveries": extra,
            "heartbeat_takeovers_logged": reclaimed,
            "batches_by_surviving_workers": batches,
            "mean_batch_seconds": round(batch_seconds / batches, 2) if batches else None,
            "batches_over_2_5_s": slow_batches,
            "seconds": round(elapsed, 1),
            "kill_log": kill_log,
        }
        return result
    finally:
        for worker in workers.values():
            worker.stop()
        await store.close()
        client.close()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--kill-every", type=float, nargs=2, default=(6.0, 12.0))
    parser.add_argument("--length", type=int, nargs=2, default=(300, 500))
    parser.add_argument("--batch-jobs", type=int, default=2)
    parser.add_argument("--visibility", type=float, default=3.0)
    parser.add_argument("--max-deliveries", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=1))
    bad = result["lost"] or result["falsely_failed"] or result["false_dead_letters"]
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
