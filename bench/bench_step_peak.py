"""Where a training step's time goes, against what this CPU's matmuls can do.

    PYTHONPATH=. python bench/bench_step_peak.py [--dtype auto] [--threads 1] [--reps 3]

One optimizer step of `deliberate train`'s default geometry (2 windows of 256 tokens, K = 12
points, N_L = 8, N_A = 16, --placement replace_tail; random token ids, which cost what text
costs) on the real bundled decoder, forward and backward:
- its matmul FLOPs, counted by torch's FlopCounterMode (mm, addmm, bmm, attention);
- its wall time (median of --reps), hence the FLOP rate it reaches;
- the peak of this CPU in the same dtype and threads: a square 2048 GEMM, and a GEMM of the
  decoder's own MLP shape (the step's tokens x 576 x 1536), each the best of --reps;
- torch.profiler's self time per op class (matmul kernels, attention, the rest), which says
  how much of the step is not matmul at all.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
ATTENTION_MARK = "attention"


def gemm_flops_per_s(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)  # warm-up: the kernel choice and the first allocation
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * m * k * n / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def op_class(name: str) -> str:
    if ATTENTION_MARK in name:
        return "attention"
    if name in MATMUL_OPS or name.startswith("mkldnn") or "gemm" in name:
        return "matmul"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    from coprocessor_worker.data import sample_positions
    from coprocessor_worker.model import build_model, load_decoder, torch_dtype
    from coprocessor_worker.train_config import TrainConfig
    from deliberate.models import prepare_bundled_decoder
    from deliberate.settings import Settings

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(placement="replace_tail", dtype=args.dtype)
    compute = torch_dtype(cfg.dtype)
    decoder, tokenizer = load_decoder(prepare_bundled_decoder(Settings().cache_dir), compute)
    model = build_model(decoder, tokenizer, cfg.coprocessor_config(), compute)
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(100, 40000, (cfg.batch_windows, cfg.window)))
    lengths = np.full(cfg.batch_windows, cfg.window)
    pos = torch.from_numpy(sample_positions(rng, cfg, lengths))
    params = [p for g in model.trainable_parameters().values() for p in g]

    def step() -> None:
        for p in params:
            p.grad = None
        nll, _ = model.packed_nll(ids, pos, cfg.n_ahead)
        nll.mean().backward()

    step()  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    seconds = float(np.median([_timed(step) for _ in range(args.reps)]))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    self_us: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        self_us[op_class(event.key)] += event.self_cpu_time_total
    total_us = sum(self_us.values())
    step_tokens = cfg.batch_windows * cfg.window
    peak_square = gemm_flops_per_s(2048, 2048, 2048, compute, args.reps)
    peak_mlp = gemm_flops_per_s(step_tokens, 576, 1536, compute, args.reps)
    result = {
        "dtype": str(compute).removeprefix("torch."),
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "geometry": {k: getattr(cfg, k) for k in ("batch_windows", "window", "positions",
                                                   "n_latents", "n_ahead", "placement")},
        "step_seconds_median": seconds,
        "step_matmul_gflop": flops / 1e9,
        "gflop_by_op": {str(op): n / 1e9 for op, n in counter.get_flop_counts()["Global"].items()},
        "step_gflop_per_s": flops / seconds / 1e9,
        "peak_gflop_per_s": {"gemm_2048": peak_square / 1e9, "gemm_mlp_shape": peak_mlp / 1e9},
        "fraction_of_peak": {"gemm_2048": flops / seconds / peak_square,
                             "gemm_mlp_shape": flops / seconds / peak_mlp},
        "self_time_share": {k: v / total_us for k, v in sorted(self_us.items())},
        "top_ops_self_ms": {
            e.key: round(e.self_cpu_time_total / 1e3, 1)
            for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
        },
    }  # fmt: skip
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
