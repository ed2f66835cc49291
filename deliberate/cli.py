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
        passthrough = getattr(module, "PASSTHROUGH", None)
        child = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__ or module.HELP,
            epilog=passthrough,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            # A subcommand passing unknown flags on (serve: vLLM's engine flags) must not
            # take `--max-num` for one of its own by abbreviation.
            allow_abbrev=passthrough is None,
        )
        module.add_arguments(child)
        child.set_defaults(run=module.run, passthrough=passthrough is not None)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not args.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra_args = extra
    sys.exit(args.run(args))
