"""Coprocessor ablations: short runs from scratch that differ from the default recipe in one
setting each, compared on the same held-out windows and points at the same step.

    PYTHONPATH=. python bench/ablations.py --out /work/runs/ablations [--steps 30] [--only lr-x3]

Each variant is one `deliberate train` run (resumable: run again to finish what was cut);
the table of held-out perplexity change against no latents at each variant's last
evaluation goes to OUT/ablations.md and OUT/ablations.json. Results: docs/coprocessor.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from coprocessor_worker.evaluate import read_log

VARIANTS: dict[str, list[str]] = {
    "reference (LoRA r16, N_L 8, lr 1e-3/3e-3)": [],
    "lr x3": ["--lr", "3e-3", "--lr-embed", "1e-2", "--lr-proj", "1e-2"],
    "LoRA rank 4": ["--lora-rank", "4", "--lora-alpha", "8"],
    "N_L 16": ["--n-latents", "16"],
    "output direct (no base)": ["--output", "direct"],
    "states before the final norm": ["--hidden-source", "pre_norm"],
    "pause tokens (no coprocessor)": ["--method", "pause"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(" (")[0].lower()).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=None, help="variant slugs to run")
    args = parser.parse_args()

    rows = {}
    for name, flags in VARIANTS.items():
        run = args.out / slug(name)
        if args.only is None or slug(name) in args.only:
            print(f"== {name}: {run}", flush=True)
            command = [
                *("deliberate", "train", "--out", str(run), "--steps", str(args.steps)),
                *("--warmup", "5", "--eval-every", str(args.steps)),
                *("--eval-windows", str(args.eval_windows), *flags),
            ]
            subprocess.run(command, check=True)
        if (run / "log.jsonl").is_file():
            steps, evals = read_log(run)
            seconds = [s["seconds"] for s in steps]
            rows[name] = {
                "flags": " ".join(flags),
                "step": evals[-1]["step"],
                "rel_ppl_change": evals[-1]["rel_ppl_change"],
                "mean": evals[-1]["rel_ppl_change_mean"],
                "seconds_per_step": sum(seconds) / max(1, len(seconds)),
            }
    (args.out / "ablations.json").write_text(json.dumps(rows, indent=2) + "\n")
    positions = sorted({p for r in rows.values() for p in r["rel_ppl_change"]}, key=int)
    lines = [
        "| variant | step | " + " | ".join(f"@{p}" for p in positions) + " | mean | s/step |",
        "|---|---|" + "---|" * len(positions) + "---|---|",
    ]
    for name, r in rows.items():
        cells = [f"{100 * r['rel_ppl_change'][p]:+.1f}%" for p in positions]
        lines.append(
            f"| {name} | {r['step']} | "
            + " | ".join(cells)
            + f" | {100 * r['mean']:+.1f}% | {r['seconds_per_step']:.1f} |"
        )
    (args.out / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
