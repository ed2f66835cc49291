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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry
from sse_starlette.sse import AppStatus
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.tool_parsers import ToolParser

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
from server.engine import engine_args, served_names, start_engine
from server.metrics import ServerMetrics
from server.serving_chat import tool_parser_class

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


def engine_overrides(settings: Settings, model_dir: Path) -> dict[str, Any]:
    """The engine arguments `deliberate serve` owns, set over vLLM's flags: the model is the
    resolved decoder folder, the dtype is the one the embedding table is read in."""
    overrides: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": settings.compute_dtype(),
        "enforce_eager": settings.enforce_eager,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
    }
    if settings.max_model_len is not None:
        overrides["max_model_len"] = settings.max_model_len
    return overrides


def build_engine_args(
    settings: Settings, model_dir: Path, engine_argv: Sequence[str] = ()
) -> AsyncEngineArgs:
    args = engine_args(engine_argv, engine_overrides(settings, model_dir))
    if args.served_model_name is None:  # vLLM's flag not given
        args.served_model_name = settings.served_model_name or model_dir.name
    return args


def load_chat_template(template: str | None) -> str | None:
    """As vLLM's --chat-template: a file's contents, or the template itself."""
    if template is None:
        return None
    path = Path(template)
    try:
        if path.is_file():
            return path.read_text()
    except OSError:
        pass
    if any(c in template for c in "{}"):
        return template
    raise ValueError(f"--chat-template {template!r}: neither a file nor a template")


def auto_tool_parser(settings: Settings, tokenizer: Any) -> type[ToolParser] | None:
    """vLLM's tool-call parser for tool_choice "auto", when --enable-auto-tool-choice is on."""
    if settings.tool_call_parser is None:
        return None
    parser = tool_parser_class(settings.tool_call_parser, tokenizer)  # checked either way
    if not settings.enable_auto_tool_choice:
        # As `vllm serve`, the flag alone is accepted; here it has nothing to do.
        log.warning(
            "--tool-call-parser %s has no effect without --enable-auto-tool-choice",
            settings.tool_call_parser,
        )
        return None
    return parser


async def log_engine_stats(engine: Any, interval_s: float = 10.0) -> None:
    """As `vllm serve`: vLLM's throughput and cache lines in the log every 10 s."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await engine.do_log_stats()
        except Exception as exc:  # never let logging end the server
            log.debug("engine stats: %r", exc)


async def serve(settings: Settings, engine_argv: Sequence[str] = ()) -> None:
    """`engine_argv`: vLLM's own engine flags (`--max-num-seqs 64`, ...), passed through."""
    import torch
    from transformers import AutoTokenizer
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    api_keys = settings.api_key_tenants()  # a bad key file fails here, before the slow start
    payload_secret = settings.payload_mac_key()  # so does a missing secret file
    chat_template = load_chat_template(settings.chat_template)
    warn_if_open(settings.host, api_keys)
    model_dir = decoder_dir(settings)
    args = build_engine_args(settings, model_dir, engine_argv)  # bad vLLM flags fail here
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
    worker_task = stats_task = engine = None
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
            payload_secret=payload_secret,
        )
        if runs_embedded_worker(settings):
            worker = make_worker(settings, store, registry)
            worker_task = asyncio.create_task(worker.run(worker_stop), name="embedded-worker")
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer, trust_remote_code=args.trust_remote_code
        )
        tool_parser = auto_tool_parser(settings, tokenizer)  # a bad parser fails before the engine
        engine = start_engine(args, cpu_kv_cache_gib=settings.kv_cache_gib)
        names = served_names(args)
        model_config = engine.model_config
        state = ServerState(
            engine=engine,
            tokenizer=tokenizer,
            augmenter=augmenter,
            model_name=names[0],
            aliases=names[1:],
            max_model_len=model_config.max_model_len,
            max_context_tokens=settings.max_context_tokens,
            api_keys=api_keys,
            metrics=metrics,
            registry=registry,
            created=int(time.time()),
            metrics_key=settings.metrics_key,
            chat_template=chat_template,
            vocab_size=model_config.get_vocab_size(),
            default_sampling=model_config.get_diff_sampling_param(),
            tool_parser=tool_parser,
            engine_registry=None if args.disable_log_stats else get_prometheus_registry(),
        )
        if not args.disable_log_stats:
            stats_task = asyncio.create_task(log_engine_stats(engine), name="engine-stats")
        app = create_app(
            state,
            max_request_bytes=settings.max_request_bytes,
            max_concurrent_requests=settings.max_concurrent_requests,
            docs=settings.docs,
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                log_level="info",
                # Past this, uvicorn cancels the requests still running: their engine
                # requests are aborted and the cleanup below runs, within the pod's grace.
                timeout_graceful_shutdown=settings.shutdown_timeout_seconds,  # type: ignore[arg-type]
            )
        )
        # sse-starlette ends every stream at once on SIGTERM (cut short, no [DONE]); streams
        # get the same bounded time to finish as other requests instead.
        AppStatus.disable_automatic_graceful_drain()
        # uvicorn stops on SIGTERM/SIGINT, then re-raises the signal to whatever handler was
        # there before; a no-op one lets the cleanup below (worker batch, engine, store) run,
        # and the process exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        await server.serve()
    finally:
        if stats_task is not None:
            stats_task.cancel()
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
