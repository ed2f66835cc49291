"""The vLLM engine the server decodes with: built once per process, prompt embeddings on."""

from __future__ import annotations

import os
from pathlib import Path

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM

from deliberate.settings import Settings


def engine_args(model_dir: Path, settings: Settings) -> AsyncEngineArgs:
    return AsyncEngineArgs(
        model=str(model_dir),
        tokenizer=str(model_dir),
        served_model_name=settings.served_model_name or model_dir.name,
        dtype=settings.compute_dtype(),
        max_model_len=settings.max_model_len,
        enforce_eager=settings.enforce_eager,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        # Augmented prompts arrive as embeddings; they are built by the server only, never
        # taken from clients (CVE-2025-62164).
        enable_prompt_embeds=True,
        # Prefix caching keys on token ids; embedding prompts bypass it, token prompts keep it.
        enable_prefix_caching=True,
        disable_log_stats=True,
    )


def start_engine(model_dir: Path, settings: Settings) -> AsyncLLM:
    """Start the engine core (a spawned process). Callers need an `if __name__ == "__main__"`
    guard in their entry script, as with any vLLM process."""
    # vLLM's CPU backend reads its KV cache budget from the environment only.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.kv_cache_gib))
    return AsyncLLM.from_engine_args(engine_args(model_dir, settings))
