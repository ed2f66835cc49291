"""The vLLM engine the server decodes with: built once per process from vLLM's own engine
flags (`AsyncEngineArgs.add_cli_args` / `from_cli_args`), prompt embeddings forced on.

Every flag `vllm serve` takes for its engine works here (`--tensor-parallel-size`,
`--max-num-seqs`, `--quantization`, `--kv-cache-dtype`, `--trust-remote-code`,
`--served-model-name` with aliases, ...). The caller (`deliberate serve`) fixes the few it owns
itself (the model folder, dtype, ...) through `overrides`; nothing here reads settings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.v1.engine.async_llm import AsyncLLM

FORCED: Mapping[str, Any] = {
    # Augmented prompts arrive as embeddings; they are built by the server only, never
    # taken from clients (CVE-2025-62164).
    "enable_prompt_embeds": True,
}


def engine_parser() -> FlexibleArgumentParser:
    parser = FlexibleArgumentParser(prog="deliberate serve", add_help=False)
    return AsyncEngineArgs.add_cli_args(parser)


def engine_args(
    argv: Sequence[str] = (), overrides: Mapping[str, Any] | None = None
) -> AsyncEngineArgs:
    """vLLM's engine arguments parsed from `argv` (vLLM's flags) with `overrides` set over
    them, and prompt embeddings on whatever was asked.

    vLLM's prefix cache is on (its default) and hashes prompt embeddings per block (vLLM >=
    0.11), so repeated augmented prompts reuse KV blocks as token prompts do; stats are on
    (its default; `--disable-log-stats` turns them off), which is what fills the `vllm:`
    Prometheus series."""
    namespace = engine_parser().parse_args(list(argv))
    args = AsyncEngineArgs.from_cli_args(namespace)
    for name, value in {**(overrides or {}), **FORCED}.items():
        if not hasattr(args, name):
            raise AttributeError(f"vLLM's engine arguments have no '{name}'")
        setattr(args, name, value)
    if args.tokenizer is None:
        args.tokenizer = args.model
    return args


def start_engine(args: AsyncEngineArgs, *, cpu_kv_cache_gib: int | None = None) -> AsyncLLM:
    """Start the engine core (a spawned process). Callers need an `if __name__ == "__main__"`
    guard in their entry script, as with any vLLM process. vLLM's CPU backend reads its KV
    cache budget from the environment only (VLLM_CPU_KVCACHE_SPACE, GiB)."""
    if cpu_kv_cache_gib is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gib))
    return AsyncLLM.from_engine_args(args)


def served_names(args: AsyncEngineArgs) -> tuple[str, ...]:
    """The names the model answers to: vLLM's --served-model-name (one or several), else
    the model path."""
    names = args.served_model_name
    if names is None:
        return (str(args.model),)
    if isinstance(names, str):
        return (names,)
    return tuple(names)
