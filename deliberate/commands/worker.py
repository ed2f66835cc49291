"""Run a coprocessor worker: claim augmentation jobs from the store, compute latents in
batches, publish them. Many workers share one consumer group.

SIGTERM (or Ctrl-C) finishes the batch in hand, hands back the rest and exits; a worker that
dies without that (kill -9) loses nothing either: its jobs are reclaimed by others after the
visibility timeout.
"""

from __future__ import annotations

import argparse

from deliberate.commands import (
    MODEL_FLAGS,
    STORE_FLAGS,
    VALUE_FLAGS,
    WORKER_FLAGS,
    add_settings_flags,
    settings_from_args,
)

HELP = "run a coprocessor worker (consumes the job queue, publishes latents)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(
        parser,
        *MODEL_FLAGS,
        *STORE_FLAGS,
        *WORKER_FLAGS,
        *VALUE_FLAGS,
        "worker_host",
        "worker_metrics_port",
        "worker_consumer",
        "payload_secret_file",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import os
    import sys

    from deliberate.serving import run_worker_process

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from_args(args)
    if settings.redis_url is None:
        raise SystemExit(
            "deliberate worker needs --redis-url (or DELIBERATE_REDIS_URL): the in-memory store "
            "lives inside `deliberate serve`, which runs its own worker"
        )
    from cache_store.checkpoint import CheckpointMismatch

    try:
        asyncio.run(run_worker_process(settings))
    except CheckpointMismatch as exc:
        # An operator error, not a crash: one clear line naming both fingerprints, exit 1.
        raise SystemExit(f"deliberate worker: refusing to start: {exc}") from None
    # Everything is released by now (batch finished or handed back, store and health port
    # closed). The interpreter's own teardown would then spend ~8 s garbage-collecting the
    # model's objects on a busy 2-core machine, eating into the pod's termination grace
    # period for nothing: leave at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
