"""Packed multi-position training step against the naive per-position loop, same data.

    PYTHONPATH=. python bench/bench_train.py [--windows 1] [--positions 12] [--reps 3]

Both compute the same loss and gradients (tests/test_coprocessor.py shows it); this measures
wall time of forward + backward on the real bundled decoder (fp32, --threads threads), and
reports supervised ahead tokens per second and the ratio. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=1)
    parser.add_argument("--positions", type=int, default=12)
    parser.add_argument("--n-latents", type=int, default=8)
    parser.add_argument("--n-ahead", type=int, default=8)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="lora", choices=["lora", "pause"])
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = parser.parse_args()

    from coprocessor_worker.model import CoprocessorConfig, build_model, load_decoder
    from deliberate.models import prepare_bundled_decoder
    from deliberate.settings import Settings

    torch.set_num_threads(args.threads)
    decoder_dir = prepare_bundled_decoder(Settings().cache_dir)
    decoder, tokenizer = load_decoder(decoder_dir, torch.float32)
    config = CoprocessorConfig(method=args.method, n_latents=args.n_latents)
    model = build_model(decoder, tokenizer, config, torch.float32)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(100, 40000, (args.windows, args.window)))
    hi = args.window - args.n_ahead + 1
    pos = torch.from_numpy(
        np.stack(
            [
                np.sort(rng.choice(np.arange(32, hi), args.positions, replace=False))
                for _ in range(args.windows)
            ]
        )
    )
    params = [p for g in model.trainable_parameters().values() for p in g]

    def packed() -> float:
        nll, _ = model.packed_nll(ids, pos, args.n_ahead)
        nll.mean().backward()
        return float(nll.mean().detach())

    def naive() -> float:
        nll = model.naive_nll(ids, pos, args.n_ahead)
        nll.mean().backward()
        return float(nll.mean().detach())

    times: dict[str, list[float]] = {"packed": [], "naive": []}
    losses = {}
    for _ in range(args.reps):  # interleaved, so load from other processes hits both alike
        for name, fn in (("packed", packed), ("naive", naive)):
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            losses[name] = fn()
            times[name].append(time.perf_counter() - t0)
    ahead = args.windows * args.positions * args.n_ahead
    result = {
        "method": args.method,
        "windows": args.windows,
        "positions": args.positions,
        "n_latents": args.n_latents,
        "n_ahead": args.n_ahead,
        "window": args.window,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "seconds_median": {k: float(np.median(v)) for k, v in times.items()},
        "ahead_tokens_per_s": {k: ahead / float(np.median(v)) for k, v in times.items()},
        "speedup": float(np.median(times["naive"]) / np.median(times["packed"])),
        "loss": losses,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
