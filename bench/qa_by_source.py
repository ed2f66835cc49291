"""Where a checkpoint's serving-form accuracy comes from: per source, and for yes/no items
how often each model answers "yes".

    PYTHONPATH=. python bench/qa_by_source.py CHECKPOINT [CHECKPOINT ...] [--items 300]

The gate's QA set is mostly BoolQ (yes/no, scored by the higher-likelihood choice), whose
held-out items are about 63% "yes"; the out-of-domain QA set (SciRIFF's yes/no questions) is
too. So latents that only tilt every answer towards "yes" raise accuracy to the majority
rate without reading the passage. This splits the accuracy of the plain decoder and of each
checkpoint by source, next to the majority rate, the share of "yes" answers and the
balanced accuracy (an answer that ignores the item scores 0.5 whatever its bias), on the
items `deliberate eval` scores (the same selection: permutation of seed 0, first `--items` /
`--ood-items`), in the QA form. Extractive items (SQuAD, DROP, CoQA) count as right when
greedy decoding reproduces the answer; a format prior alone rarely does that.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from coprocessor_worker import data
from coprocessor_worker.checkpoint_io import load_model
from coprocessor_worker.model import torch_dtype
from coprocessor_worker.serving_eval import answer_scores


def yes_no_figures(cell: dict[str, int]) -> dict[str, float]:
    """The share of "yes" answers (choice 0 in both yes/no sets: right on a "yes" item, wrong
    on a "no" one), and the mean of the accuracies on "yes" and on "no" items: 0.5 for any
    answer that ignores the item, whatever its bias."""
    yes = cell["right_0"] + cell["n_1"] - cell["right_1"]
    return {
        "yes_rate": yes / cell["n"],
        "balanced_acc": (cell["right_0"] / cell["n_0"] + cell["right_1"] / cell["n_1"]) / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--items", type=int, default=300, help="held-out QA items")
    parser.add_argument("--ood-items", type=int, default=200, help="out-of-domain QA items")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from deliberate.models import prepare_bundled_decoder
    from deliberate.settings import Settings

    torch.set_num_threads(args.threads)
    decoder_dir = prepare_bundled_decoder(Settings().cache_dir)
    models, tokenizer = {}, None
    for checkpoint in args.checkpoints:
        models[checkpoint.parent.name + "/" + checkpoint.name], _, tokenizer = load_model(
            checkpoint, decoder_dir, compute_dtype=torch_dtype("auto")
        )
    first = next(iter(models.values()))
    sets = {
        "qa": (data.qa_items, args.items),
        "qa_out_of_domain": (data.out_of_domain_qa_items, args.ood_items),
    }
    # counts[set][source][model] = {"n", "right", "n_<label>", "right_<label>"}
    counts: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(int))))
    yes_no: set[tuple[str, str]] = set()  # the (set, source) pairs with two choices
    with torch.no_grad():
        for set_name, (read, n) in sets.items():
            items = read()
            for i in np.random.default_rng(0).permutation(len(items))[:n]:
                item = items[i]
                inputs = data.qa_inputs(tokenizer, item, "qa")
                prefix = first.prefix_pass(torch.tensor([inputs.context]))
                if len(inputs.answers) == 2:
                    yes_no.add((set_name, item.source))
                for name, model in {"none": first, **models}.items():
                    right = answer_scores(model, prefix, inputs, name != "none")[1]
                    cell = counts[set_name][item.source][name]
                    for key in ("", f"_{inputs.label}"):
                        cell["n" + key] += 1
                        cell["right" + key] += right
    result = {
        set_name: {
            source: {
                "n": (plain := by_model["none"])["n"],
                "majority_rate": max(plain["n_0"], plain["n_1"]) / plain["n"],
                **{
                    name: {"acc": c["right"] / c["n"], "right": c["right"]}
                    | (yes_no_figures(c) if (set_name, source) in yes_no else {})
                    for name, c in by_model.items()
                },
            }
            for source, by_model in by_source.items()
        }
        for set_name, by_source in counts.items()
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
