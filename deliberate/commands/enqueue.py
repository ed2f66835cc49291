"""Queue augmentations for many contexts ahead of traffic (the offline batch: say, every
user's history each night).

FILE is JSON Lines, one object per line: {"context": "...", "tenant": "..."} ("tenant" is
optional). Contexts go to a running server's POST /v1/augmentations in batches, so keys are
derived exactly as the server derives them. Prints how many were new, already ready, pending,
refused (queue full) or failed.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

HELP = "queue augmentations for a JSONL file of contexts"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", type=Path, help="JSONL file, one {'context': ...} per line")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DELIBERATE_API_KEY"),
        help="bearer key, if the server wants one (env DELIBERATE_API_KEY)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="contexts per request")


def read_contexts(path: Path) -> Iterator[dict[str, str]]:
    with path.open() as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SystemExit(f"{path}:{number}: not JSON ({exc.msg})") from exc
            if not isinstance(item, dict) or not isinstance(item.get("context"), str):
                raise SystemExit(f"{path}:{number}: expected an object with a 'context' string")
            yield {k: item[k] for k in ("context", "tenant") if k in item}


def summarize(results: list[dict[str, str]]) -> Counter[str]:
    """One word per context: new, ready, pending, refused or failed."""
    words = {
        "enqueued": "new",
        "already_ready": "ready",
        "already_pending": "pending",
        "queue_full": "refused",
        "failed": "failed",
    }
    return Counter(words.get(r["outcome"], r["outcome"]) for r in results)


def run(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    items = list(read_contexts(args.file))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    results: list[dict[str, str]] = []
    with (
        httpx.Client(base_url=args.url, headers=headers, timeout=60) as http,
        tqdm(total=len(items), desc="enqueue", unit="ctx") as progress,
    ):
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            response = http.post("/v1/augmentations", json={"contexts": batch})
            if response.status_code != 200:
                raise SystemExit(
                    f"server refused contexts {start + 1}-{start + len(batch)}: "
                    f"HTTP {response.status_code}: {response.text}"
                )
            results.extend(response.json()["data"])
            progress.update(len(batch))
    counts = summarize(results)
    print(", ".join(f"{counts[w]} {w}" for w in ("new", "ready", "pending", "refused", "failed")))
    return 0 if counts["failed"] == 0 else 1
