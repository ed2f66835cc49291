"""The recipe-ablation tables from `deliberate eval` result.json files (several runs of the
same sizes): per checkpoint, the in-domain and out-of-domain perplexity change at ahead
positions 1, 4, 8, 16 and the answer-perplexity change of every serving form the results
hold (QA, chat, out-of-domain QA), each with its 95% CI; `--view with_value_check` gives the
same as served by the default configuration (declined contexts count as no change), with the
share of contexts served.

    python bench/recipe_ablation_table.py RESULT.json [RESULT.json ...] > table.md
    python bench/recipe_ablation_table.py --view with_value_check RESULT.json ... > served.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TEXT_SETS = ("in_domain", "out_of_domain")
POSITIONS = ("1", "4", "8", "16")


def cell(v: dict[str, float]) -> str:
    return f"{v['change']:+.1%} ({v['ci_low']:+.1%}..{v['ci_high']:+.1%})"


def rows(result: dict, forms: list[str], view: str) -> list[str]:
    table_key = "perplexity" if view == "raw" else "perplexity_with_value_check"
    acc_key = "acc" if view == "raw" else "acc_with_value_check"
    out = []
    for name in result["text"]["in_domain"]["perplexity"]:
        if name == "none":
            continue
        cells = []
        for set_name in TEXT_SETS:
            table = result["text"][set_name][table_key][name]
            cells += [cell(table[p]) for p in POSITIONS]
        for form in forms:
            summary = result["serving"][form][name]
            cells.append(f"{cell(summary[view])}; acc {summary[acc_key]:.3f}")
        if view != "raw":
            served = [result["text"][s]["served_fraction"][name] for s in TEXT_SETS]
            served += [result["serving"][f][name]["served_fraction"] for f in forms]
            cells.append(" / ".join(f"{s:.0%}" for s in served))
        out.append(f"| {name.split(':')[-1]} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path)
    parser.add_argument("--view", choices=["raw", "with_value_check"], default="raw")
    args = parser.parse_args()
    results = [json.loads(p.read_text()) for p in args.results]
    forms = [f for f in ("qa", "chat", "qa_out_of_domain") if f in results[0]["serving"]]
    header = ["checkpoint"]
    for set_name in TEXT_SETS:
        header += [f"{set_name.replace('_', '-')} @{p}" for p in POSITIONS]
    for form in forms:
        acc_none = results[0]["serving"][form]["acc_none"]
        header.append(f"{form.replace('_', ' ')} answer ppl (acc none {acc_none:.3f})")
    if args.view != "raw":
        header.append(f"served ({' / '.join(['in', 'out', *forms])})")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for result in results:
        print("\n".join(rows(result, forms, args.view)))


if __name__ == "__main__":
    main()
