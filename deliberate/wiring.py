"""Building the parts from one `Settings`: the store, the decoder and coprocessor paths, the
worker. Shared by `deliberate serve` (which may run a worker inside) and `deliberate worker`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
from pathlib import Path

from prometheus_client import CollectorRegistry

from cache_store import AugmentationStore, open_store
from cache_store.value import ValuePolicy
from coprocessor_worker.checkpoints import bundled_checkpoint_dir
from coprocessor_worker.coprocessor import Coprocessor, ValueCheck
from coprocessor_worker.worker import AugmentationWorker, WorkerLimits, WorkerMetrics
from deliberate.models import resolve_decoder
from deliberate.settings import Settings

log = logging.getLogger(__name__)


def decoder_dir(settings: Settings) -> Path:
    return resolve_decoder(settings.model, settings.cache_dir)


def coprocessor_dir(settings: Settings) -> Path:
    return settings.coprocessor or bundled_checkpoint_dir()


def value_policy(settings: Settings) -> ValuePolicy:
    """The serve/decline rule both the server and the workers apply (cache_store.value)."""
    return ValuePolicy(
        enabled=settings.value_check,
        min_contexts=settings.value_min_contexts,
        tolerance=settings.value_tolerance,
    )


def make_store(settings: Settings, registry: CollectorRegistry) -> AugmentationStore:
    return open_store(
        settings.redis_url,
        payload_ttl_s=settings.payload_ttl_seconds,
        max_queue_length=settings.max_queue_length,
        visibility_timeout_s=settings.visibility_timeout_seconds,
        max_deliveries=settings.max_deliveries,
        max_payload_bytes=settings.max_payload_bytes,
        declined_ttl_s=settings.declined_ttl_seconds,
        max_connections=settings.store_max_connections,
        breaker_failures=settings.store_breaker_failures,
        breaker_cooldown_s=settings.store_breaker_cooldown_seconds,
        registry=registry,
    )


def make_worker(
    settings: Settings, store: AugmentationStore, registry: CollectorRegistry
) -> AugmentationWorker:
    """Load the decoder and coprocessor (seconds) and build a worker around them."""
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    model_dir = decoder_dir(settings)
    dtype = getattr(torch, settings.compute_dtype())
    # The worker is the one place the coprocessor runs for serving: use the GPU if there is one.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Computed in the configured dtype; latents handed over in fp32 (the payload encoder
    # casts them to its own wire dtype).
    model = Coprocessor.load(
        coprocessor_dir(settings),
        model_dir,
        dtype=torch.float32,
        compute_dtype=dtype,
        device=device,
    )
    log.info(
        "coprocessor %s (fingerprint %s) for decoder %s loaded on %s in %s",
        coprocessor_dir(settings),
        model.fingerprint,
        model.decoder_fingerprint,
        device,
        settings.compute_dtype(),
    )
    config = json.loads((model_dir / "config.json").read_text())
    placed = model.model.config  # where the vectors go: after the context or on its tail
    limits = WorkerLimits(
        max_jobs=settings.worker_batch_max_jobs,
        max_tokens=settings.worker_batch_max_tokens,
        max_prefix_tokens=min(
            settings.max_model_len or config["max_position_embeddings"],
            config["max_position_embeddings"],
        )
        - placed.added_positions,
        min_prefix_tokens=placed.shortest_context,
        vocab_size=config["vocab_size"],
        block_s=settings.worker_claim_block_seconds,
        dead_consumer_s=settings.worker_dead_consumer_seconds,
    )
    consumer = settings.worker_consumer or f"{socket.gethostname()}-{os.getpid()}"
    return AugmentationWorker(
        store,
        model,
        consumer=consumer,
        limits=limits,
        metrics=WorkerMetrics(registry),
        check=ValueCheck.recorded_for(coprocessor_dir(settings)),
        policy=value_policy(settings),
        payload_secret=settings.payload_mac_key(),
    )


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so loops can finish what they hold and exit."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
