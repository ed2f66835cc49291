"""Queue augmentations for many contexts ahead of traffic (the offline batch: say, every
user's history each night).

FILE is JSON Lines, one object per line: {"context": "...", "tenant": "..."} ("tenant" is
optional). Contexts go to a running server's POST /v1/augmentations in batches, so keys are
derived exactly as the server derives them. Prints how many were new, already ready, pending,
refused (queue full), failed (recently dead-lettered) or rejected (the server refused that
context, e.g. too long; the others still go through).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when the command runs: `deliberate --help` stays fast
    import httpx

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
    """One word per context: new, ready, pending, refused (queue full), failed (recently
    dead-lettered), rejected (the server refused the context itself, e.g. too long) or
    too-short (below the server's min_context_tokens, or no longer than the tail the
    checkpoint's latents replace, so never augmented)."""
    words = {
        "enqueued": "new",
        "already_ready": "ready",
        "already_pending": "pending",
        "queue_full": "refused",
        "failed": "failed",
        "rejected": "rejected",
        "too-short": "too-short",  # never augmented (Augmenter's too-short rule)
    }
    return Counter(words.get(r["outcome"], r["outcome"]) for r in results)


SUMMARY_WORDS = ("new", "ready", "pending", "refused", "failed", "rejected", "too-short")


def _post(http: httpx.Client, batch: list[dict[str, str]]) -> httpx.Response:
    return http.post("/v1/augmentations", json={"contexts": batch})


def submit(
    http: httpx.Client, items: list[dict[str, str]], batch_size: int, progress: Any
) -> list[dict[str, str]]:
    """Send contexts in batches; returns one result per context, in order.

    A batch the server refuses as a whole (4xx: one context too long, say) is retried one
    context at a time, so one bad line costs only itself in a nightly run of thousands."""
    results: list[dict[str, str]] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        response = _post(http, batch)
        if response.status_code == 200:
            results.extend(response.json()["data"])
        elif 400 <= response.status_code < 500 and response.status_code not in (401, 403):
            for offset, item in enumerate(batch):
                single = _post(http, [item]) if len(batch) > 1 else response
                if single.status_code == 200:
                    results.extend(single.json()["data"])
                    continue
                if not 400 <= single.status_code < 500:
                    _refused(start + offset, start + offset, single)
                print(
                    f"context {start + offset + 1} rejected: HTTP {single.status_code}: "
                    f"{single.text[:300]}",
                    file=sys.stderr,
                )
                results.append({"outcome": "rejected"})
        else:
            _refused(start, start + len(batch) - 1, response)
        progress.update(len(batch))
    return results


def _refused(first: int, last: int, response: httpx.Response) -> None:
    raise SystemExit(
        f"server refused contexts {first + 1}-{last + 1}: "
        f"HTTP {response.status_code}: {response.text[:500]}"
    )


def run(args: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    items = list(read_contexts(args.file))
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with (
        httpx.Client(base_url=args.url, headers=headers, timeout=60) as http,
        tqdm(total=len(items), desc="enqueue", unit="ctx") as progress,
    ):
        results = submit(http, items, args.batch_size, progress)
    counts = summarize(results)
    print(", ".join(f"{counts[w]} {w}" for w in SUMMARY_WORDS))
    return 0 if counts["failed"] == 0 and counts["rejected"] == 0 else 1
