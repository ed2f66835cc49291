"""The recipe-ablation tables from `deliberate eval` result.json files (several runs of the
same sizes): per checkpoint, the in-domain and out-of-domain perplexity change at ahead
positions 1, 4, 8, 16 and the answer-perplexity change of every serving form the results
hold (QA, chat, out-of-domain QA), each with its 95% CI; `--view with_value_check` gives the
same as served by the default configuration (declined contexts count as no change), with the
share of contexts served.

`--across-seeds` puts the training seeds of one recipe in one row: the mean change over the
seeds, then each seed's change. A checkpoint named `RECIPE-seedN` is seed N of RECIPE; one
without the suffix is seed 0. The per-run CIs are over documents for one trained model, so
they do not show how far another seed moves a figure; this view does.

    python bench/recipe_ablation_table.py RESULT.json [RESULT.json ...] > table.md
    python bench/recipe_ablation_table.py --view with_value_check RESULT.json ... > served.md
    python bench/recipe_ablation_table.py --across-seeds RESULT.json ... > seeds.md
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

TEXT_SETS = ("in_domain", "out_of_domain")
POSITIONS = ("1", "4", "8", "16")
SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def cell(v: dict[str, float]) -> str:
    return f"{v['change']:+.1%} ({v['ci_low']:+.1%}..{v['ci_high']:+.1%})"


def checkpoints(result: dict) -> list[str]:
    return [name for name in result["text"]["in_domain"]["perplexity"] if name != "none"]


def short_name(name: str) -> str:
    """A checkpoint's name without the `kind:` prefix an evaluation of several adds."""
    return name.split(":")[-1]


def text_summaries(result: dict, name: str, view: str) -> list[dict[str, float]]:
    """One checkpoint's text changes with their CIs: each set, each position."""
    table_key = "perplexity" if view == "raw" else "perplexity_with_value_check"
    return [result["text"][s][table_key][name][p] for s in TEXT_SETS for p in POSITIONS]


def form_summaries(result: dict, name: str, forms: list[str], view: str) -> list[dict]:
    return [result["serving"][form][name][view] for form in forms]


def rows(result: dict, forms: list[str], view: str) -> list[str]:
    acc_key = "acc" if view == "raw" else "acc_with_value_check"
    out = []
    for name in checkpoints(result):
        cells = [cell(s) for s in text_summaries(result, name, view)]
        for form, summary in zip(forms, form_summaries(result, name, forms, view), strict=True):
            cells.append(f"{cell(summary)}; acc {result['serving'][form][name][acc_key]:.3f}")
        if view != "raw":
            served = [result["text"][s]["served_fraction"][name] for s in TEXT_SETS]
            served += [result["serving"][f][name]["served_fraction"] for f in forms]
            cells.append(" / ".join(f"{s:.0%}" for s in served))
        out.append(f"| {short_name(name)} | " + " | ".join(cells) + " |")
    return out


def recipe_and_seed(name: str) -> tuple[str, int]:
    name = short_name(name)
    match = SEED_SUFFIX.search(name)
    return (name[: match.start()], int(match[1])) if match else (name, 0)


def rows_across_seeds(results: list[dict], forms: list[str], view: str) -> list[str]:
    by_recipe: dict[str, dict[int, list[float]]] = {}
    for result in results:
        for name in checkpoints(result):
            recipe, seed = recipe_and_seed(name)
            seeds = by_recipe.setdefault(recipe, {})
            if seed in seeds:
                raise SystemExit(f"{recipe} seed {seed} is in more than one result")
            summaries = text_summaries(result, name, view)
            summaries += form_summaries(result, name, forms, view)
            seeds[seed] = [s["change"] for s in summaries]
    out = []
    for recipe, seeds in by_recipe.items():
        runs = [seeds[seed] for seed in sorted(seeds)]
        cells = [
            f"{sum(values) / len(values):+.1%} ({' / '.join(f'{v:+.1%}' for v in values)})"
            for values in zip(*runs, strict=True)
        ]
        label = f"{recipe} (seeds {', '.join(map(str, sorted(seeds)))})"
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--view", choices=["raw", "with_value_check"], default="raw")
    parser.add_argument(
        "--across-seeds", action="store_true", help="one row per recipe: seed mean, each seed"
    )
    args = parser.parse_args()
    results = [json.loads(p.read_text()) for p in args.results]
    forms = [f for f in ("qa", "chat", "qa_out_of_domain") if f in results[0]["serving"]]
    header = ["recipe (mean over seeds, each seed)" if args.across_seeds else "checkpoint"]
    for set_name in TEXT_SETS:
        header += [f"{set_name.replace('_', '-')} @{p}" for p in POSITIONS]
    for form in forms:
        acc_none = results[0]["serving"][form]["acc_none"]
        header.append(f"{form.replace('_', ' ')} answer ppl (acc none {acc_none:.3f})")
    if args.view != "raw" and not args.across_seeds:
        header.append(f"served ({' / '.join(['in', 'out', *forms])})")
    if args.across_seeds:
        body = rows_across_seeds(results, forms, args.view)
    else:
        body = [row for result in results for row in rows(result, forms, args.view)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(body))


if __name__ == "__main__":
    main()
