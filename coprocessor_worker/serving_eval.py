"""Evaluation in the serving form, and of the value check that protects it.

In serving, a context is followed by a real prompt and only then by the answer. So:

- **QA form**: a held-out passage (the context), then `\\nQuestion: ...\\nAnswer:`, then the
  answer; scored is the NLL of the answer's tokens with latents inserted right after the
  passage, where the server puts them, against none. Accuracy: the higher-likelihood choice
  where the set has choices (BoolQ), else whether greedy decoding reproduces the answer.
- **chat form**: the same through the decoder's chat template, with the passage as the
  system message and the question as the last user message (the server's default split:
  every message before the last user message is the context, server/prompts.py), so the
  template's tokens sit between the latents and the answer.

Every context also gets the worker's value check (`Coprocessor.latents_with_value`: latents
at earlier points of the context, scored on its own tail), and `protected` replays the
decision the store and server make from those figures (cache_store.value) in stream order:
a context is served latents only if, once its own figure is recorded, the running estimate
allows it and its own figure is not confidently harmful. Declined contexts count as no
change. That is the effect a user of the default configuration gets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cache_store.value import ValueEstimate, ValueFigure, ValuePolicy, confidently_harmful, verdict
from coprocessor_worker.coprocessor import ValueCheck
from coprocessor_worker.data import QAForm, QAInputs, QAItem, qa_inputs
from coprocessor_worker.evaluate import check_figures, continuation_logprobs
from coprocessor_worker.model import CoprocessorModel


@torch.no_grad()
def answer_scores(
    model: CoprocessorModel, prefix: tuple, inputs: QAInputs, use_latents: bool
) -> tuple[np.ndarray, bool]:
    """Mean NLL per answer token of the correct answer, and whether the model gets it right."""
    conts = [inputs.prompt + a for a in inputs.answers]
    scores = continuation_logprobs(model, prefix, inputs.context, conts, use_latents, 0)
    skip = len(inputs.prompt)
    answer_logp = [s[0][skip:] for s in scores]
    nll = -float(answer_logp[inputs.label].mean())
    if len(conts) > 1:
        correct = int(np.argmax([lp.sum() for lp in answer_logp])) == inputs.label
    else:
        correct = bool(scores[0][1][skip:].all())
    return np.float64(nll), correct


@torch.no_grad()
def serving_form(
    models: dict[str, CoprocessorModel],
    tokenizer: Any,
    items: list[QAItem],
    form: QAForm,
    check: ValueCheck,
) -> dict[str, Any]:
    """Per item: the plain decoder's answer NLL and accuracy, and each model's, with the
    value-check figure of the item's context."""
    from tqdm import tqdm

    first = next(iter(models.values()))
    between = check.prompt_ids(tokenizer)
    out: dict[str, Any] = {
        "none": {"nll": [], "correct": []},
        **{n: {"nll": [], "correct": [], "figure": []} for n in models},
    }
    for item in tqdm(items, desc=f"serving form ({form})", unit="item"):
        inputs = qa_inputs(tokenizer, item, form)
        ids = torch.tensor([inputs.context])
        prefix = first.prefix_pass(ids)
        nll, correct = answer_scores(first, prefix, inputs, use_latents=False)
        out["none"]["nll"].append(nll)
        out["none"]["correct"].append(correct)
        for name, model in models.items():
            nll, correct = answer_scores(model, prefix, inputs, use_latents=True)
            out[name]["nll"].append(nll)
            out[name]["correct"].append(correct)
            context = torch.tensor([[ids.shape[1]]])  # the whole passage is the context
            out[name]["figure"] += check_figures(model, ids, prefix, context, check, between)
    return out


def protected(figures: list[ValueFigure | None], policy: ValuePolicy) -> np.ndarray:
    """Which contexts, in stream order, would be served latents: each figure is recorded in
    the running estimate when its context's latents are published, before the context is
    served again."""
    estimate = ValueEstimate()
    served = np.zeros(len(figures), dtype=bool)
    for i, figure in enumerate(figures):
        if figure is not None:
            estimate = estimate.add(figure.delta)
        served[i] = verdict(estimate, estimate, policy).serve and not confidently_harmful(
            figure, policy
        )
    return served


def change_with_ci(delta: np.ndarray, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """exp(mean delta) - 1 with a 95% bootstrap CI over items (delta in nats per item)."""
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(delta), size=(n_bootstrap, len(delta)))
    boot = np.expm1(delta[samples].mean(1))
    return {
        "change": float(np.expm1(delta.mean())),
        "ci_low": float(np.percentile(boot, 2.5)),
        "ci_high": float(np.percentile(boot, 97.5)),
    }


def summarise(scores: dict[str, Any], policy: ValuePolicy, n_bootstrap: int = 1000) -> dict:
    """{model: {raw, with_value_check, served_fraction, acc, acc_none}} of serving_form's
    output: answer perplexity change against no latents, raw and as protected."""
    base = np.asarray(scores["none"]["nll"])
    out: dict[str, Any] = {"n": len(base), "acc_none": float(np.mean(scores["none"]["correct"]))}
    for name, row in scores.items():
        if name == "none":
            continue
        delta = np.asarray(row["nll"]) - base
        served = protected(row["figure"], policy)
        figures = [f.delta for f in row["figure"] if f is not None]
        out[name] = {
            "raw": change_with_ci(delta, n_bootstrap),
            "with_value_check": change_with_ci(np.where(served, delta, 0.0), n_bootstrap),
            "served_fraction": float(served.mean()),
            "acc": float(np.mean(row["correct"])),
            "acc_with_value_check": float(
                np.mean(np.where(served, row["correct"], scores["none"]["correct"]))
            ),
            "check_mean_change": float(np.expm1(np.mean(figures))) if figures else None,
            "check_vs_served_correlation": _correlation(row["figure"], delta),
        }
    return out


def _correlation(figures: list[ValueFigure | None], delta: np.ndarray) -> float | None:
    pairs = [(f.delta, d) for f, d in zip(figures, delta, strict=True) if f is not None]
    if len(pairs) < 3:
        return None
    a, b = np.asarray(pairs).T
    return float(np.corrcoef(a, b)[0, 1])
