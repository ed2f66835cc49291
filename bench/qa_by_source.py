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
from coprocessor_worker.evaluate import continuation_logprobs
from coprocessor_worker.model import torch_dtype
from coprocessor_worker.serving_eval import answer_scores


def yes_no_prediction(model, prefix, inputs: data.QAInputs, use_latents: bool) -> tuple[int, bool]:
    """(index of the higher-likelihood choice, whether it is the label) of a two-choice item;
    choice 0 is "yes" in both yes/no sets."""
    conts = [inputs.prompt + a for a in inputs.answers]
    scores = continuation_logprobs(model, prefix, inputs.context, conts, use_latents, 0)
    skip = len(inputs.prompt)
    choice = int(np.argmax([s[0][skip:].sum() for s in scores]))
    return choice, choice == inputs.label


def yes_no_figures(cell: dict[str, int]) -> dict[str, float]:
    """The share of "yes" answers, and the mean of the accuracies on "yes" and on "no" items:
    0.5 for any answer that ignores the item, whatever its bias."""
    return {
        "yes_rate": cell["yes"] / cell["n"],
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
    # counts[set][source][model] = {"n", "right", "yes", "n_<label>", "right_<label>"};
    # "yes": the first choice answered
    counts: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(int))))
    labels: dict = defaultdict(lambda: defaultdict(int))  # (set, source) -> label -> items
    yes_no: set[tuple[str, str]] = set()  # the (set, source) pairs with two choices
    with torch.no_grad():
        for set_name, (read, n) in sets.items():
            items = read()
            for i in np.random.default_rng(0).permutation(len(items))[:n]:
                item = items[i]
                inputs = data.qa_inputs(tokenizer, item, "qa")
                prefix = first.prefix_pass(torch.tensor([inputs.context]))
                labels[set_name, item.source][inputs.label] += 1
                if len(inputs.answers) == 2:
                    yes_no.add((set_name, item.source))
                for name, model in {"none": first, **models}.items():
                    cell = counts[set_name][item.source][name]
                    cell["n"] += 1
                    cell[f"n_{inputs.label}"] += 1
                    if len(inputs.answers) == 2:
                        choice, right = yes_no_prediction(model, prefix, inputs, name != "none")
                        cell["yes"] += choice == 0
                    else:
                        right = answer_scores(model, prefix, inputs, name != "none")[1]
                    cell["right"] += right
                    cell[f"right_{inputs.label}"] += right
    result = {
        set_name: {
            source: {
                "n": by_model["none"]["n"],
                "majority_rate": max(labels[set_name, source].values()) / by_model["none"]["n"],
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
