"""What the value check costs the worker: `Coprocessor.latents_with_value` (serving latents
plus the check's latents and scoring, in the same packed passes) against `latents` alone
(the worker's forward without the check), on the same prefixes.

The two are timed alternately on other contexts each round, and the ratio of the mean times
is reported (the cost amortized over the contexts, of which `--sample` are checked), so load
drift on a shared machine hits both sides alike.

    python bench/bench_value_check.py --lengths 128 256 512 1024 --batches 1 4 --rounds 5 \
        [--points 1] [--sample 1] [--prompt $'\\nQuestion: What comes next in the text?\\nAnswer:']

Prints a Markdown table (paste it into docs/benchmarks.md with the command and machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from coprocessor_worker.checkpoints import bundled_checkpoint_dir
from coprocessor_worker.coprocessor import Coprocessor, ValueCheck
from coprocessor_worker.data import bundled_documents
from deliberate.models import resolve_decoder
from deliberate.settings import Settings


def prefixes(tokenizer, length: int, count: int) -> list[list[int]]:
    """Real prose, `count` prefixes of `length` tokens each (documents joined as needed)."""
    stream: list[int] = []
    for doc in bundled_documents("held_out"):
        stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(stream) >= length * count:
            break
    return [stream[i * length : (i + 1) * length] for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--points", type=int, default=ValueCheck.points, help="check points")
    parser.add_argument("--prompt", default="", help="the check's prompt (ValueCheck.prompt)")
    parser.add_argument(
        "--sample", type=float, default=ValueCheck.sample, help="share of contexts checked"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = Coprocessor.load(
        bundled_checkpoint_dir(), resolve_decoder(None, Settings().cache_dir), dtype=torch.float32
    )
    check = ValueCheck(points=args.points, prompt=args.prompt, sample=args.sample)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} thread(s), compute dtype {model.model.compute_dtype}; check {check}"
    )
    print("\n| prefix tokens | batch | forward alone (s) | with the check (s) | ratio | checked |")
    print("|---|---|---|---|---|---|")
    for length in args.lengths:
        for batch in args.batches:
            # Other contexts each round: with sample < 1, which are checked differs by context.
            inputs = prefixes(model.tokenizer, length, batch * args.rounds)
            model.latents_with_value(inputs[:batch], check)  # warm-up: first-call allocations
            alone, checked = 0.0, 0.0
            for r in range(args.rounds):
                batch_inputs = inputs[r * batch : (r + 1) * batch]
                t0 = time.perf_counter()
                model.latents(batch_inputs)
                alone += time.perf_counter() - t0
                t0 = time.perf_counter()
                model.latents_with_value(batch_inputs, check)
                checked += time.perf_counter() - t0
            share = sum(bool(check.points_for(p)) for p in inputs) / len(inputs)
            a, c = alone / args.rounds, checked / args.rounds
            print(
                f"| {length} | {batch} | {a:.3f} | {c:.3f} | {c / a:.2f}x | {share:.0%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
