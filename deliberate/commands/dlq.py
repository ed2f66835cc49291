"""Inspect and requeue dead letters: jobs the workers gave up on (a poison prefix, an error
that recurred when the job was computed alone, or too many deliveries without a result).

deliberate dlq list [--limit N] [--json]   newest first: time, key, deliveries, reason
deliberate dlq requeue KEY [KEY ...]       clear each key's failed mark and enqueue its job
deliberate dlq requeue --all               the same for every dead letter

A requeued job starts afresh (delivery 1, enqueue time now); its dead letter is removed
unless the queue is full. Letters that hold no valid job (an entry that was never one of
ours) cannot be requeued and are reported.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from deliberate.commands import add_settings_flags, settings_from_args

if TYPE_CHECKING:
    from cache_store import AugmentationStore, DeadLetter

HELP = "list dead-lettered jobs and requeue them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list dead letters, newest first")
    listing.add_argument("--limit", type=int, default=100, help="most letters shown")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    requeue = actions.add_parser("requeue", help="put dead-lettered jobs back on the queue")
    chosen = requeue.add_mutually_exclusive_group(required=True)
    chosen.add_argument("keys", nargs="*", default=[], metavar="KEY", help="prefix keys")
    chosen.add_argument("--all", action="store_true", help="every dead letter")
    for child in (listing, requeue):
        add_settings_flags(child, "redis_url")


def _line(letter: DeadLetter) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(letter.failed_at))
    return f"{when}Z  {letter.key or '(not a job)'}  deliveries={letter.deliveries}  " + (
        letter.reason.replace("\n", " ")
    )


async def _letters(store: AugmentationStore, limit: int) -> list[DeadLetter]:
    return await store.dead_letters(limit)


async def _list(store: AugmentationStore, args: argparse.Namespace) -> int:
    letters = await _letters(store, args.limit)
    for letter in letters:
        if args.json:
            print(json.dumps({
                "id": letter.stream_id, "key": letter.key, "reason": letter.reason,
                "deliveries": letter.deliveries, "failed_at": letter.failed_at,
            }))  # fmt: skip
        else:
            print(_line(letter))
    if not args.json:
        print(f"{len(letters)} dead letter(s)")
    return 0


async def _requeue(store: AugmentationStore, args: argparse.Namespace) -> int:
    from cache_store import MalformedJob

    letters = await _letters(store, store.config.max_dead_letters)
    if args.all:
        chosen = letters
    else:
        wanted = set(args.keys)
        # The newest letter of each key: older ones of the same key are answered by it.
        seen: set[str] = set()
        chosen = []
        for letter in letters:
            if letter.key in wanted and letter.key not in seen:
                seen.add(letter.key)
                chosen.append(letter)
        for key in sorted(wanted - seen):
            print(f"{key}: no dead letter")
    outcomes: dict[str, int] = {}
    bad = 0
    for letter in chosen:
        try:
            outcome = await store.requeue(letter)
        except MalformedJob as exc:
            print(f"{letter.stream_id}: not requeued: {exc}")
            bad += 1
            continue
        outcomes[outcome.value] = outcomes.get(outcome.value, 0) + 1
        print(f"{letter.key}: {outcome.value}")
    summary = ", ".join(f"{n} {name}" for name, n in sorted(outcomes.items())) or "nothing"
    print(f"requeued: {summary}" + (f"; {bad} not requeued (no valid job)" if bad else ""))
    missing = not args.all and len(chosen) < len(set(args.keys))
    refused = outcomes.get("queue_full", 0) + outcomes.get("failed", 0)
    return 1 if (bad or missing or refused) else 0


def run(args: argparse.Namespace) -> int:
    import asyncio

    from prometheus_client import CollectorRegistry

    from deliberate.wiring import make_store

    settings = settings_from_args(args)
    if settings.redis_url is None:
        raise SystemExit(
            "deliberate dlq needs --redis-url (or DELIBERATE_REDIS_URL): the in-memory store "
            "lives inside `deliberate serve` and ends with it"
        )

    async def main() -> int:
        async with make_store(settings, CollectorRegistry()) as store:
            if args.action == "list":
                return await _list(store, args)
            return await _requeue(store, args)

    return asyncio.run(main())
