"""Build a local lm-eval-harness task over the bundled held-out QA data (no hub needed).

Writes `<out>/deliberate_qa.jsonl` (passage, question, answer) and `<out>/deliberate_qa.yaml`,
a loglikelihood task: the answer's log-likelihood after the passage and question, which
lm-eval's `local-completions` model reads from `echo` + `logprobs` (docs/vllm-parity.md).

    python bench/lm_eval/build_task.py /tmp/lm-eval-task --limit 50
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coprocessor_worker.data import qa_items

YAML = """task: deliberate_qa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{passage}}}}\\n\\nQuestion: {{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=50)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl = args.out / "deliberate_qa.jsonl"
    items = qa_items("held_out")[: args.limit]
    with jsonl.open("w") as f:
        for item in items:
            row = {"passage": item.passage, "question": item.question, "answer": item.answer}
            f.write(json.dumps(row) + "\n")
    (args.out / "deliberate_qa.yaml").write_text(YAML.format(jsonl=jsonl.resolve()))
    print(f"{len(items)} items: {jsonl}")


if __name__ == "__main__":
    main()
