"""`deliberate serve`: the decoder service, and in the embedded default the worker beside it.

The embedded default is one process: the in-memory store, the HTTP server and a worker loop
on the same event loop (the worker's forward passes run in a thread). With a Redis URL the
server is the distributed decoder and runs no worker unless asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time

import uvicorn
from prometheus_client import CollectorRegistry

from cache_store.checkpoint import CheckpointInfo
from cache_store.fingerprint import decoder_fingerprint
from deliberate.settings import Settings
from deliberate.wiring import (
    coprocessor_dir,
    decoder_dir,
    make_store,
    make_worker,
    stop_on_signals,
    value_policy,
)
from server.app import ServerState, create_app, is_loopback
from server.augmentation import Augmenter
from server.embeddings import EmbeddingTable
from server.engine import start_engine
from server.metrics import ServerMetrics

log = logging.getLogger("deliberate.serve")


def warn_if_open(host: str, api_keys: dict[str, str]) -> bool:
    """Log a warning when the API is served beyond loopback without keys; True if so."""
    if api_keys or is_loopback(host):
        return False
    log.warning(
        "authentication is off and the server listens on %s: anyone who can reach the port "
        "can generate and read augmentation states. Set --api-keys or --api-keys-file.",
        host,
    )
    return True


def runs_embedded_worker(settings: Settings) -> bool:
    if settings.embedded_worker is not None:
        return settings.embedded_worker
    return settings.redis_url is None


async def serve(settings: Settings) -> None:
    import torch
    from transformers import AutoTokenizer

    api_keys = settings.api_key_tenants()  # a bad key file fails here, before the slow start
    warn_if_open(settings.host, api_keys)
    model_dir = decoder_dir(settings)
    checkpoint = CheckpointInfo.read(coprocessor_dir(settings))
    fingerprint = decoder_fingerprint(model_dir)
    checkpoint.require_decoder(fingerprint)  # before the slow engine start, not after
    if not checkpoint.gate(settings.value_check):
        log.warning(
            "coprocessor %s did not pass its quality gate %s (%s): latents are %s",
            checkpoint.path,
            "with the value check" if settings.value_check else "without the value check",
            checkpoint.gate_rule,
            "applied anyway (--allow-unvalidated-coprocessor)"
            if settings.allow_unvalidated_coprocessor
            else "not applied (status skipped-unvalidated)",
        )
    registry = CollectorRegistry()
    metrics = ServerMetrics(registry)
    store = make_store(settings, registry)
    worker_stop = asyncio.Event()
    worker_task = None
    engine = None
    # Everything after the store is opened may fail (the coprocessor or the engine refusing
    # to start): the embedded worker is then stopped and the store closed, not left behind.
    try:
        dtype = getattr(torch, settings.compute_dtype())
        augmenter = Augmenter(
            store=store,
            embeddings=EmbeddingTable.load(model_dir, dtype),
            decoder_fp=fingerprint,
            coprocessor=checkpoint,
            default_tenant=settings.tenant,
            min_context_tokens=settings.min_context_tokens,
            lookup_timeout_s=settings.lookup_timeout_seconds,
            max_wait_s=settings.max_augment_wait_seconds,
            allow_unvalidated=settings.allow_unvalidated_coprocessor,
            value_policy=value_policy(settings),
            value_refresh_s=settings.value_refresh_seconds,
            metrics=metrics,
        )
        if runs_embedded_worker(settings):
            worker = make_worker(settings, store, registry)
            worker_task = asyncio.create_task(worker.run(worker_stop), name="embedded-worker")
        engine = start_engine(model_dir, settings)
        state = ServerState(
            engine=engine,
            tokenizer=AutoTokenizer.from_pretrained(model_dir),
            augmenter=augmenter,
            model_name=settings.served_model_name or model_dir.name,
            max_model_len=settings.max_model_len,
            max_context_tokens=settings.max_context_tokens,
            api_keys=api_keys,
            metrics=metrics,
            registry=registry,
            created=int(time.time()),
            metrics_key=settings.metrics_key,
        )
        app = create_app(
            state,
            max_request_bytes=settings.max_request_bytes,
            max_concurrent_requests=settings.max_concurrent_requests,
            docs=settings.docs,
        )
        server = uvicorn.Server(
            uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info")
        )
        # uvicorn stops on SIGTERM/SIGINT, then re-raises the signal to whatever handler was
        # there before; a no-op one lets the cleanup below (worker batch, engine, store) run,
        # and the process exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        await server.serve()
    finally:
        worker_stop.set()
        if worker_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await worker_task
        if engine is not None:
            engine.shutdown()
        await store.close()


async def run_worker_process(settings: Settings) -> None:
    """`deliberate worker`: one worker loop plus its health port, until SIGTERM."""
    from coprocessor_worker.health import health_app

    registry = CollectorRegistry()
    store = make_store(settings, registry)
    worker = make_worker(settings, store, registry)
    stop = stop_on_signals()
    health = None
    if settings.worker_metrics_port:
        health = uvicorn.Server(
            uvicorn.Config(
                health_app(registry, lambda: worker.ready),
                host=settings.worker_host,
                port=settings.worker_metrics_port,
                log_level="warning",
            )
        )
        # In its own thread uvicorn leaves signals alone (it takes them only in the main
        # thread): SIGTERM belongs to the worker loop, which decides when the process ends.
        health_thread = threading.Thread(target=health.run, name="health", daemon=True)
        health_thread.start()
    try:
        await worker.run(stop)
    finally:
        if health is not None:
            health.should_exit = True
            health_thread.join(timeout=5)
        await store.close()
