"""Serve the OpenAI-compatible API on vLLM, with latent augmentation.

With no arguments: the embedded default (bundled SmolLM2-135M decoder and coprocessor,
in-memory store, a worker inside the process). With --redis-url: the distributed decoder;
workers run as `deliberate worker` processes or pods (add --embedded-worker to keep one here).
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

HELP = "serve the OpenAI-compatible API (embedded default: one process does everything)"
PASSTHROUGH = """vLLM's engine flags:
  every other flag is vLLM's own (AsyncEngineArgs, as `vllm serve` takes them) and goes to
  the engine: --tensor-parallel-size, --max-num-seqs, --max-num-batched-tokens,
  --quantization, --kv-cache-dtype, --trust-remote-code, --served-model-name NAME [ALIAS
  ...], --kv-transfer-config, --disable-log-stats, ... (list them with
  `python -m vllm.entrypoints.openai.api_server --help`). Prompt embeddings are always on.
  --model, --dtype, --max-model-len, --enforce-eager and --gpu-memory-utilization are this
  command's own (above)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(
        parser,
        "host",
        "port",
        *MODEL_FLAGS,
        *STORE_FLAGS,
        *WORKER_FLAGS,
        *VALUE_FLAGS,
        "value_refresh_seconds",
        "tenant",
        "api_keys",
        "api_keys_file",
        "metrics_key",
        "docs",
        "max_concurrent_requests",
        "shutdown_timeout_seconds",
        "store_max_connections",
        "store_breaker_failures",
        "store_breaker_cooldown_seconds",
        "payload_secret_file",
        "min_context_tokens",
        "max_context_tokens",
        "max_request_bytes",
        "lookup_timeout_seconds",
        "max_augment_wait_seconds",
        "allow_unvalidated_coprocessor",
        "embedded_worker",
        "enforce_eager",
        "kv_cache_gib",
        "gpu_memory_utilization",
        "chat_template",
        "enable_auto_tool_choice",
        "tool_call_parser",
    )


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from deliberate.serving import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(serve(settings_from_args(args), getattr(args, "extra_args", [])))
    return 0
