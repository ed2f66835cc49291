"""Subcommands of the `deliberate` CLI and the flags they share with `Settings`."""

from __future__ import annotations

import argparse
from typing import Any, get_args

from deliberate.settings import Settings

# Flags that every process touching models or the store takes.
MODEL_FLAGS = ("model", "coprocessor", "cache_dir", "dtype", "max_model_len", "torch_threads")
STORE_FLAGS = (
    "redis_url",
    "payload_ttl_seconds",
    "max_queue_length",
    "visibility_timeout_seconds",
    "max_deliveries",
    "max_payload_bytes",
    "declined_ttl_seconds",
)
# The value check's rule: the server and the workers must apply the same one.
VALUE_FLAGS = ("value_check", "value_min_contexts", "value_tolerance")
WORKER_FLAGS = (
    "worker_batch_max_jobs",
    "worker_batch_max_tokens",
    "worker_claim_block_seconds",
    "worker_dead_consumer_seconds",
)


def add_settings_flags(parser: argparse.ArgumentParser, *names: str) -> None:
    """Add `--<name>` flags mirroring `Settings` fields; unset flags fall back to env vars."""
    group = parser.add_argument_group("settings (also env vars DELIBERATE_<NAME>)")
    for name in names:
        field = Settings.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = field.default
        # argparse expands %-formats in help strings: a literal "%" must be doubled.
        help_text = f"{field.description} (default: {default})".replace("%", "%%")
        if field.annotation is bool or bool in get_args(field.annotation):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        choices = get_args(field.annotation) if "Literal" in str(field.annotation) else None
        group.add_argument(
            flag, default=None, metavar=name.upper(), choices=choices or None, help=help_text
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from env vars, overridden by whichever mirrored flags were given."""
    overrides: dict[str, Any] = {
        name: value
        for name, value in vars(args).items()
        if name in Settings.model_fields and value is not None
    }
    return Settings(**overrides)
