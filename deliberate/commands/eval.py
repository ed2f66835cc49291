"""Evaluate coprocessor and pause-token checkpoints against the plain decoder.

  deliberate eval --coprocessor RUN/best --pause PAUSE_RUN/best --out results/
  deliberate eval --coprocessor CKPT --record      # also write the table and quality gate
                                                   # into CKPT/evaluation.json
  deliberate eval --curves RUN1 RUN2 --out plots/  # held-out curves of training runs

Held-out perplexity change at ahead positions 1, 2, 4, 8, 16 on in-domain and out-of-domain
text (paired bootstrap CIs over documents), the serving form (passage, question, answer; plain
and through the chat template), each raw and as served with the value check, and
log-likelihood accuracy on ARC-Easy, HellaSwag and LAMBADA. Writes OUT/result.json,
OUT/result.md and OUT/result.png.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from deliberate.commands import add_settings_flags, settings_from_args

HELP = "evaluate coprocessor / pause checkpoints (perplexity table, accuracy, quality gate)"
TASKS = ["arc_easy", "hellaswag", "lambada"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coprocessor",
        dest="coprocessors",  # not `coprocessor`: that is a Settings field (the serving one)
        type=Path,
        action="append",
        default=[],
        metavar="CKPT",
        help="coprocessor checkpoint (repeatable)",
    )
    parser.add_argument(
        "--pause",
        type=Path,
        action="append",
        default=[],
        metavar="CKPT",
        help="pause-token checkpoint (repeatable)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for result.{json,md,png}")
    parser.add_argument(
        "--tasks",
        nargs="*",
        default=TASKS,
        choices=[*TASKS, "arc_challenge", "mmlu"],
        help=f"accuracy sets (default: {' '.join(TASKS)}; none: --tasks)",
    )
    parser.add_argument("--n-docs", type=int, default=200, help="held-out documents")
    parser.add_argument("--mc-items", type=int, default=200, help="items per accuracy set")
    parser.add_argument("--positions-per-doc", type=int, default=8)
    parser.add_argument(
        "--n-ood-docs",
        type=int,
        default=150,
        help="out-of-domain documents (the Python reference shipped in CPython; 0: skip)",
    )
    parser.add_argument(
        "--qa-items",
        type=int,
        default=300,
        help="held-out passage/question/answer items, each scored in the QA and chat form",
    )
    parser.add_argument(
        "--ood-qa-items",
        type=int,
        default=200,
        help="out-of-domain items in the QA form (biomedical yes/no questions; 0: skip)",
    )
    parser.add_argument(
        "--check-prompt",
        default="",
        metavar="TEXT",
        help="the value check's prompt: text put between each check point and the tail it "
        "scores, in both runs, as a served prompt sits between latents and answer (default: "
        "none, the tail right after the latents)",
    )
    parser.add_argument(
        "--check-skip",
        type=int,
        default=None,
        help="tail tokens the value check leaves unscored (default: the check's, 3)",
    )
    parser.add_argument(
        "--check-sample",
        type=float,
        default=None,
        help="share of contexts the value check measures, the rest served on the running "
        "estimate alone (default: the check's, 0.5)",
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        default=None,
        metavar="PATH",
        help="held-out text from a user's corpus instead of the bundled prose",
    )
    parser.add_argument(
        "--curves",
        nargs="+",
        type=Path,
        default=[],
        metavar="RUN",
        help="training run folders: plot their held-out curves into OUT/curves.png",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float32"],
        default="auto",
        help="compute dtype (auto: bf16 only where the hardware has it)",
    )
    parser.add_argument(
        "--record",
        action="store_true",
        help="write evaluation + quality gate into each checkpoint's evaluation.json",
    )
    add_settings_flags(parser, "cache_dir", "model")


def run(args: argparse.Namespace) -> int:
    import torch

    from coprocessor_worker.checkpoint_io import load_model
    from coprocessor_worker.coprocessor import ValueCheck
    from coprocessor_worker.evaluate import (
        EvalConfig,
        evaluate,
        plot_learning_curves,
        record_in_checkpoint,
    )
    from coprocessor_worker.model import torch_dtype
    from deliberate.models import resolve_decoder

    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    decoder = resolve_decoder(Path(settings.model) if settings.model else None, settings.cache_dir)
    named: list[tuple[str, Path]] = []
    for kind, paths in (("pause", args.pause), ("coprocessor", args.coprocessors)):
        for p in paths:
            named.append((kind if len(paths) == 1 else f"{kind}:{p.name}", p))
    if args.curves:
        args.out.mkdir(parents=True, exist_ok=True)
        plot_learning_curves({run.name: run for run in args.curves}, args.out / "curves.png")
        print(f"learning curves: {args.out / 'curves.png'}")
        if not named:
            return 0
    if not named:
        raise SystemExit("give at least one --coprocessor or --pause checkpoint (or --curves)")
    models, tokenizer = {}, None
    for name, path in named:
        # Separate decoder copies: LoRA is injected into its decoder in place.
        model, _, tokenizer = load_model(path, decoder, compute_dtype=torch_dtype(args.dtype))
        models[name] = model
    docs = None
    if args.corpus:
        from coprocessor_worker.data import corpus_documents

        docs = corpus_documents(args.corpus, "held_out")
    cfg = EvalConfig(
        n_docs=args.n_docs,
        mc_items=args.mc_items,
        positions_per_doc=args.positions_per_doc,
        n_ood_docs=args.n_ood_docs,
        qa_items=args.qa_items,
        ood_qa_items=args.ood_qa_items,
    )
    check = ValueCheck(prompt=args.check_prompt)
    if args.check_skip is not None:
        check = replace(check, skip=args.check_skip)
    if args.check_sample is not None:
        check = replace(check, sample=args.check_sample)
    result = evaluate(models, tokenizer, cfg, args.out, list(args.tasks), docs, check=check)
    print((args.out / "result.md").read_text())
    if args.record:
        for name, path in named:
            record_in_checkpoint(path, name, result)
            print(f"recorded evaluation and quality gate in {path / 'evaluation.json'}")
    return 0
