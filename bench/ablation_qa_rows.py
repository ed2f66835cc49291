"""Equal-step ablation on the QA serving form (session 3): the then-bundled checkpoint (600
steps; now `-insert`), +40 steps of prose, +40 steps of prose with 2 QA rows a step
(`--qa-rows 2`); the same held-out items (the first N of the gate's order), scored in the QA
form. Results: docs/coprocessor.md (Ablations).

    deliberate train --out RUN_A \
        --init-from coprocessor_worker/checkpoints/smollm2-135m-instruct-insert \
        --steps 40 --warmup 1 --min-lr-ratio 1.0 --eval-every 40 --eval-windows 8
    deliberate train --out RUN_B ...the same... --qa-rows 2
    ln -s RUN_A/last ABL/prose-40; ln -s RUN_B/last ABL/qa-rows-40
    ln -s coprocessor_worker/checkpoints/smollm2-135m-instruct-insert ABL/start-600
    PYTHONPATH=. python bench/ablation_qa_rows.py ABL 120
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from cache_store.value import ValuePolicy
from coprocessor_worker import data
from coprocessor_worker.checkpoint_io import load_model
from coprocessor_worker.coprocessor import ValueCheck
from coprocessor_worker.serving_eval import serving_form, summarise
from deliberate.models import resolve_decoder
from deliberate.settings import Settings

NAMES = ("start-600", "prose-40", "qa-rows-40")


def main() -> None:
    folder, n_items = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    decoder = resolve_decoder(None, Settings().cache_dir)
    models, tokenizer = {}, None
    for name in NAMES:
        models[name], _, tokenizer = load_model(folder / name, decoder)
    items = data.qa_items("held_out")
    order = np.random.default_rng(0).permutation(len(items))[:n_items]
    scores = serving_form(models, tokenizer, [items[i] for i in order], "qa", ValueCheck())
    out = summarise(scores, ValuePolicy())
    (folder / "ablation_qa_rows.json").write_text(json.dumps(out, indent=2))
    for name in NAMES:
        print(name, "raw", out[name]["raw"], "acc", round(out[name]["acc"], 3))
    print("acc_none", out["acc_none"], "n", out["n"])


if __name__ == "__main__":
    main()
