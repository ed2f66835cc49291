"""Run one of the benchmarks in the source checkout's bench/ folder.

  deliberate bench store  [args]   cache_store get/enqueue latency, payload vs KV-cache bytes
  deliberate bench worker [args]   augmentations/s per worker against the bare forward floor
  deliberate bench server [args]   this server against `vllm serve`, side by side
  deliberate bench train  [args]   packed training step against the naive loop

Arguments after the name go to the benchmark (`deliberate bench worker --help`). Results and
the commands that made them: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

HELP = "run a benchmark from bench/ (store, worker, server, train)"

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="store, worker, server or train")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        available = sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))
        raise SystemExit(
            f"no benchmark '{args.name}' in {BENCH_DIR}"
            + (
                f"; available: {', '.join(available)}"
                if available
                else " (benchmarks ship with the source checkout, not the wheel)"
            )
        )
    # The benchmarks import the tests' process and Redis helpers from the checkout.
    sys.path.insert(0, str(BENCH_DIR.parent))
    sys.argv = [str(script), *args.args]
    runpy.run_path(str(script), run_name="__main__")
    return 0
