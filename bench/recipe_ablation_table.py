"""One table of the session-4 recipe ablation from `deliberate eval` result.json files
(several runs of the same sizes): per checkpoint, the in-domain and out-of-domain
perplexity change at ahead positions 1, 4, 8, 16 and the QA / chat answer-perplexity change,
each with its 95% CI, raw and as served with the value check.

    python bench/recipe_ablation_table.py RESULT.json [RESULT.json ...] > table.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cell(v: dict[str, float]) -> str:
    return f"{v['change']:+.1%} ({v['ci_low']:+.1%}..{v['ci_high']:+.1%})"


def rows(result: dict) -> list[str]:
    out = []
    for name in result["text"]["in_domain"]["perplexity"]:
        if name == "none":
            continue
        cells = []
        for set_name in ("in_domain", "out_of_domain"):
            table = result["text"][set_name]["perplexity"][name]
            cells += [cell(table[p]) for p in ("1", "4", "8", "16")]
        for form in ("qa", "chat"):
            summary = result["serving"][form][name]
            cells.append(f"{cell(summary['raw'])}; acc {summary['acc']:.3f}")
        served = [
            result["text"][s]["served_fraction"][name] for s in ("in_domain", "out_of_domain")
        ]
        served += [result["serving"][f][name]["served_fraction"] for f in ("qa", "chat")]
        cells.append(" / ".join(f"{s:.0%}" for s in served))
        out.append(f"| {name.split(':')[-1]} | " + " | ".join(cells) + " |")
    return out


def main() -> None:
    results = [json.loads(Path(p).read_text()) for p in sys.argv[1:]]
    acc_none = {f: results[0]["serving"][f]["acc_none"] for f in ("qa", "chat")}
    print(
        "| checkpoint | in-domain @1 | @4 | @8 | @16 | out-of-domain @1 | @4 | @8 | @16 "
        f"| QA answer ppl (acc none {acc_none['qa']:.3f}) | chat (acc none {acc_none['chat']:.3f}) "
        "| served with check (in / out / QA / chat) |"
    )
    print("|" + "---|" * 12)
    for result in results:
        print("\n".join(rows(result)))


if __name__ == "__main__":
    main()
