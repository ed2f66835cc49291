"""`deliberate`: one console script, one subcommand per job.

Each subcommand lives in `deliberate/commands/<name>.py` with `HELP`, `add_arguments(parser)`
and `run(args) -> int`. Heavy imports (torch, vLLM) stay inside `run`, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ["serve", "worker", "train", "eval", "enqueue", "dlq", "model", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deliberate",
        description="LLM serving with an offline coprocessor tier (latent cache augmentation).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"deliberate.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"deliberate.commands.{name}":
                raise
            continue  # a subcommand that has not landed yet
        child = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__ or module.HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(child)
        child.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.run(args))
