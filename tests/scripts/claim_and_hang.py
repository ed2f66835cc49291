"""Claim jobs from a Redis store, report them on stdout, then hang until killed.

The crash test runs this as a real process and SIGKILLs it while it holds a job, so no
`finally`, no release and no ack can run: exactly what a worker pod killed with -9 does.

    python tests/scripts/claim_and_hang.py REDIS_URL CONSUMER
"""

from __future__ import annotations

import asyncio
import json
import sys

from prometheus_client import CollectorRegistry

from cache_store import open_store


async def main(url: str, consumer: str) -> None:
    store = open_store(url, registry=CollectorRegistry())
    deliveries = await store.claim_jobs(consumer, max_jobs=1, block_s=10.0)
    report = [{"key": d.job.key, "stream_id": d.stream_id, "deliveries": d.deliveries}
              for d in deliveries]  # fmt: skip
    print(json.dumps(report), flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
