"""Held-out evaluation: the paper's Table 1 form, multiple-choice accuracy, and the quality gate.

1. Perplexity at ahead positions 1, 2, 4, 8, 16 after an augmentation point, for the plain
   decoder ("none"), pause tokens and the coprocessor, on held-out documents (never trained
   on: the split is by document hash). Reported as the relative change of perplexity against
   "none", exp(mean NLL_method - mean NLL_none) - 1 at each position, with a paired bootstrap
   95% confidence interval over documents.
2. Log-likelihood accuracy on ARC-Easy, HellaSwag (also length-normalised) and LAMBADA
   (greedy match of the last word, held-out passages only), latents inserted right after the
   context, before the answer - where the server would put them.
3. The quality gate (DESIGN §4.7), computed from 1. for the method under test.

One prefix pass per document is shared by all methods (the decoder is the same frozen one).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cache_store.checkpoint import write_evaluation
from cache_store.value import ValueFigure, ValuePolicy
from coprocessor_worker import data
from coprocessor_worker.coprocessor import ValueCheck
from coprocessor_worker.model import CoprocessorModel

POSITIONS = (1, 2, 4, 8, 16)
GATE_POSITIONS = (8, 16)
GATE_EPSILON = 0.01
ANSWER_EPSILON = 0.005
GATE_RULE = (
    "passed iff at ahead positions 8 and 16 the relative perplexity change against no "
    "augmentation is <= 0 and the upper end of its 95% bootstrap CI over held-out documents "
    f"is <= +{GATE_EPSILON:.0%}"
)
ANSWER_RULE = (
    "passed iff the answer-token perplexity change against no augmentation is <= 0 and the "
    f"upper end of its 95% bootstrap CI over items is <= +{ANSWER_EPSILON:.1%}"
)
CHECKPOINT_RULE = (
    "passed iff every set passes: in-domain and out-of-domain text by the perplexity rule ("
    + GATE_RULE
    + "), the QA and chat serving forms by the answer rule ("
    + ANSWER_RULE
    + "); `passed` judges the raw latents, `passed_with_value_check` the latents as the "
    "default configuration serves them (declined contexts count as no change)"
)


@dataclass
class EvalConfig:
    n_docs: int = 200
    window: int = 256
    positions_per_doc: int = 8
    min_prefix: int = 32
    n_ahead: int = 16
    batch_docs: int = 4
    n_bootstrap: int = 1000
    mc_items: int = 200  # per multiple-choice set (first N, fixed order)
    n_ood_docs: int = 150  # out-of-domain documents (0: skip the set)
    qa_items: int = 300  # held-out serving-form items, each in the QA and the chat form
    ood_qa_items: int = 200  # out-of-domain serving-form items, QA form (0: skip the set)
    seed: int = 0


# --- 1. perplexity at ahead positions ---------------------------------------------------------


def held_out_windows(
    tokenizer: Any, cfg: EvalConfig, docs: list[data.Document] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(tokens, positions) per held-out document: its first `window` tokens and K sorted
    augmentation points with room for `n_ahead` tokens after each."""
    docs = docs if docs is not None else data.bundled_documents("held_out")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(docs))
    need = cfg.min_prefix + cfg.n_ahead + cfg.positions_per_doc
    out = []
    for i in order:
        ids = np.asarray(tokenizer(docs[i].text, add_special_tokens=False)["input_ids"])
        ids = ids[: cfg.window]
        if len(ids) < need:
            continue
        choices = np.arange(cfg.min_prefix, len(ids) - cfg.n_ahead + 1)
        pos = np.sort(rng.choice(choices, cfg.positions_per_doc, replace=False))
        out.append((ids, pos))
        if len(out) == cfg.n_docs:
            break
    return out


@torch.no_grad()
def per_point_nll(
    models: dict[str, CoprocessorModel],
    windows: list[tuple[np.ndarray, np.ndarray]],
    cfg: EvalConfig,
    pad_id: int,
    check: ValueCheck | None = None,
    between: torch.Tensor | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, list[ValueFigure | None]]]:
    """NLL per (document, augmentation point, ahead position): {"none": [D, K, A], name: ...},
    and, with `check`, each model's value-check figure of the context before each point (the
    worker's check on ids[:p], flattened in document order; `between`: its prompt's ids)."""
    from tqdm import tqdm

    first = next(iter(models.values()))
    out: dict[str, list[np.ndarray]] = {"none": [], **{name: [] for name in models}}
    figures: dict[str, list[ValueFigure | None]] = {name: [] for name in models}
    for start in tqdm(range(0, len(windows), cfg.batch_docs), desc="held-out ppl", unit="batch"):
        chunk = windows[start : start + cfg.batch_docs]
        length = max(len(ids) for ids, _ in chunk)
        # Right padding: causal attention and the group mask (cache positions < p) keep the
        # padding invisible; ahead targets always lie inside the document.
        ids = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        for i, (doc, _) in enumerate(chunk):
            ids[i, : len(doc)] = torch.from_numpy(doc)
        pos = torch.from_numpy(np.stack([p for _, p in chunk])).long()
        prefix = first.prefix_pass(ids)
        base = None
        for name, model in models.items():
            nll, base = model.packed_nll(ids, pos, cfg.n_ahead, prefix=prefix)
            out[name].append(nll.numpy())
            if check is not None:
                figures[name] += check_figures(model, ids, prefix, pos, check, between)
        out["none"].append(base.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}, figures


def check_figures(
    model: CoprocessorModel,
    ids: torch.Tensor,
    prefix: tuple,
    pos: torch.Tensor,
    check: ValueCheck,
    between: torch.Tensor | None = None,
) -> list[ValueFigure | None]:
    """The worker's value check (`CoprocessorModel.check_deltas`, as the worker runs it) of
    every context ids[b, :pos[b, k]], on a prefix pass already run, in one packed pass;
    `between` is the check's prompt as token ids (`ValueCheck.prompt_ids`)."""
    points = [[check.points_for(ids[b, :p].tolist()) for p in row] for b, row in enumerate(pos)]
    flat = [[q for qs in row for q in qs] for row in points]
    width = max((len(f) for f in flat), default=0)
    if width == 0:
        return [None] * pos.numel()
    # Rows with fewer points are filled with another row's point: computable in every row
    # (inside the padded batch, after any tail the latents replace); never read back.
    filler = next(q for f in flat for q in f)
    grid = torch.tensor([f + [filler] * (width - len(f)) for f in flat])
    delta = model.check_deltas(prefix, ids, grid, check.tokens, between)[:, :, check.skip :]
    out: list[ValueFigure | None] = []
    for b, row in enumerate(points):
        used = 0
        for qs in row:
            out.append(check.figure(delta[b, used : used + len(qs)].reshape(-1)))
            used += len(qs)
    return out


def relative_change_table(
    nll: dict[str, np.ndarray], cfg: EvalConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {position: {"change", "ci_low", "ci_high"}}} with a paired bootstrap over docs."""
    rng = np.random.default_rng(cfg.seed + 1)
    base = nll["none"]
    n_docs = base.shape[0]
    samples = rng.integers(0, n_docs, size=(cfg.n_bootstrap, n_docs))
    table: dict[str, dict[str, dict[str, float]]] = {}
    positions = [p for p in POSITIONS if p <= cfg.n_ahead]
    for name, values in nll.items():
        if name == "none":
            continue
        diff = values - base  # [D, A], paired by document
        row: dict[str, dict[str, float]] = {}
        for p in [*positions, "mean"]:
            d = diff.mean(1) if p == "mean" else diff[:, p - 1]
            boot = np.exp(d[samples].mean(1)) - 1
            row[str(p)] = {
                "change": float(np.exp(d.mean()) - 1),
                "ci_low": float(np.percentile(boot, 2.5)),
                "ci_high": float(np.percentile(boot, 97.5)),
            }
        table[name] = row
    table["none"] = {
        str(p): {"nll": float(base[:, p - 1].mean()), "ppl": float(np.exp(base[:, p - 1].mean()))}
        for p in positions
    }
    return table


def quality_gate(row: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The perplexity rule on one set's row of `relative_change_table`."""
    values = {str(p): row[str(p)] for p in GATE_POSITIONS if str(p) in row}
    passed = len(values) == len(GATE_POSITIONS) and all(
        v["change"] <= 0 and v["ci_high"] <= GATE_EPSILON for v in values.values()
    )
    return {"passed": bool(passed), "rule": GATE_RULE, "values": values}


def answer_gate(effect: dict[str, float]) -> dict[str, Any]:
    """The answer rule on one serving-form effect (`serving_eval.change_with_ci`)."""
    passed = effect["change"] <= 0 and effect["ci_high"] <= ANSWER_EPSILON
    return {"passed": bool(passed), "rule": ANSWER_RULE, "values": {"answer": effect}}


def checkpoint_gate(result: dict[str, Any], name: str) -> dict[str, Any]:
    """The gate the server reads: every evaluated set, raw and with the value check."""
    sets: dict[str, dict[str, Any]] = {}
    for view, key in (("raw", "perplexity"), ("with_value_check", "perplexity_with_value_check")):
        for set_name, tables in result["text"].items():
            sets.setdefault(set_name, {})[view] = quality_gate(tables[key][name])
        for form, summary in result["serving"].items():
            sets.setdefault(form, {})[view] = answer_gate(summary[name][view])
    return {
        "passed": all(s["raw"]["passed"] for s in sets.values()),
        "passed_with_value_check": all(s["with_value_check"]["passed"] for s in sets.values()),
        "rule": CHECKPOINT_RULE,
        "sets": sets,
    }


# --- 2. multiple choice and LAMBADA ------------------------------------------------------------


@torch.no_grad()
def continuation_logprobs(
    model: CoprocessorModel,
    prefix: tuple,
    context: list[int],
    conts: list[list[int]],
    use_latents: bool,
    pad_id: int,
) -> list[np.ndarray]:
    """Log-probabilities of each continuation's tokens after the context (`prefix` is its
    prefix pass), all continuations scored at once as K groups at the same point (with
    latents or without)."""
    kv, last_hidden = prefix
    p = len(context)
    k, longest = len(conts), max(len(c) for c in conts)
    tgt = torch.full((1, k, longest), pad_id, dtype=torch.long)
    for i, c in enumerate(conts):
        tgt[0, i, : len(c)] = torch.tensor(c)
    lens = torch.full((1, k), p, dtype=torch.long)
    inputs = model.embed(tgt[:, :, :-1])
    if use_latents:
        lat = model.inserted_at(kv, torch.tensor([context]), lens).to(inputs.dtype)
        start = model.group_start(lens)
        states = model.decode_groups(kv, start, torch.cat([lat, inputs], dim=2))
        logits = model.logits(states[:, :, lat.shape[2] - 1 :])
    else:
        # The plain decoder predicts a continuation's first token from the context's last one.
        first = model.logits(last_hidden[:, p - 1 : p])[:, None].expand(1, k, 1, -1)
        if longest > 1:
            rest = model.logits(model.decode_groups(kv, lens, inputs))
            logits = torch.cat([first, rest], dim=2)
        else:
            logits = first
    logp = torch.log_softmax(logits.float(), -1)
    picked = torch.gather(logp, -1, tgt[..., None])[0, :, :, 0]
    greedy = (logits.argmax(-1) == tgt)[0]
    return [
        np.stack([picked[i, : len(c)].numpy(), greedy[i, : len(c)].numpy()])
        for i, c in enumerate(conts)
    ]


def _tokens(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def task_accuracy(
    models: dict[str, CoprocessorModel], tokenizer: Any, task: str, cfg: EvalConfig, pad_id: int
) -> dict[str, dict[str, float]]:
    from tqdm import tqdm

    first = next(iter(models.values()))
    methods = ["none", *models]
    if task == "lambada":
        items: list[Any] = data.lambada("held_out")[: cfg.mc_items]
    else:
        items = data.MULTIPLE_CHOICE_SETS[task]()[: cfg.mc_items]
    correct = {m: 0 for m in methods}
    correct_norm = {m: 0 for m in methods}
    for item in tqdm(items, desc=task, unit="item"):
        ctx = _tokens(tokenizer, item.context)
        conts = (
            [_tokens(tokenizer, item.continuation)]
            if task == "lambada"
            else [_tokens(tokenizer, c) for c in item.choices]
        )
        prefix = first.prefix_pass(torch.tensor([ctx]))
        for m in methods:
            # A context no longer than the tail the latents replace is served plainly
            # (status too-short), so it is scored plainly here too.
            latents = m != "none" and len(ctx) >= models[m].config.shortest_context
            model = models[m] if latents else first
            scores = continuation_logprobs(model, prefix, ctx, conts, latents, pad_id)
            if task == "lambada":
                correct[m] += int(scores[0][1].all())
                continue
            total = np.array([s[0].sum() for s in scores])
            per_char = total / np.array([len(c) for c in item.choices])
            correct[m] += int(total.argmax() == item.label)
            correct_norm[m] += int(per_char.argmax() == item.label)
    out = {m: {"acc": correct[m] / len(items), "n": len(items)} for m in methods}
    if task == "hellaswag":
        for m in methods:
            out[m]["acc_norm"] = correct_norm[m] / len(items)
    return out


# --- reports -----------------------------------------------------------------------------------


def _cell(v: dict[str, float]) -> str:
    return f"{v['change']:+.2%} ({v['ci_low']:+.1%}..{v['ci_high']:+.1%})"


def _text_lines(set_name: str, entry: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    table = entry["perplexity"]
    positions = list(table["none"])
    lines = [
        f"**{set_name}**: relative perplexity change against no augmentation at each ahead "
        f"position ({entry['n_docs']} held-out documents x {cfg['positions_per_doc']} points; "
        "95% bootstrap CI over documents); *+check*: as served with the value check (declined "
        "contexts count as no change).",
        "",
        "| method | " + " | ".join(f"pos {p}" for p in positions) + f" | mean 1-{positions[-1]} |",
        "|---" * (len(positions) + 2) + "|",
    ]
    for name, row in table.items():
        if name == "none":
            continue
        protected = entry["perplexity_with_value_check"][name]
        for label, r in ((name, row), (f"{name} +check", protected)):
            cells = [_cell(r[p]) for p in [*positions, "mean"]]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append(f"| {name} served | {entry['served_fraction'][name]:.0%} of contexts |")
    ppl = " | ".join(f"{table['none'][p]['ppl']:.1f}" for p in positions)
    return [*lines, f"| none (ppl) | {ppl} | |", ""]


def _serving_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        "**Serving form**: answer-token perplexity change against no augmentation (95% "
        "bootstrap CI over items), accuracy without / with latents / as served.",
        "",
        "| form | method | n | raw | +check | served | acc none | acc | acc +check |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for form, summary in result["serving"].items():
        for name, row in summary.items():
            if not isinstance(row, dict):
                continue
            lines.append(
                f"| {form} | {name} | {summary['n']} | {_cell(row['raw'])} | "
                f"{_cell(row['with_value_check'])} | {row['served_fraction']:.0%} | "
                f"{summary['acc_none']:.3f} | {row['acc']:.3f} | "
                f"{row['acc_with_value_check']:.3f} |"
            )
    return [*lines, ""]


def _task_lines(tasks: dict[str, Any]) -> list[str]:
    if not tasks:
        return []
    methods = list(next(iter(tasks.values())))
    lines = ["| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for task, row in tasks.items():
        accs = " | ".join(f"{row[m]['acc']:.3f}" for m in methods)
        lines.append(f"| {task} (n={row[methods[0]]['n']}) | {accs} |")
        if "acc_norm" in row[methods[0]]:
            norms = " | ".join(f"{row[m]['acc_norm']:.3f}" for m in methods)
            lines.append(f"| {task} acc_norm | {norms} |")
    return [*lines, ""]


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    for set_name, entry in result["text"].items():
        lines += _text_lines(set_name, entry, result["config"])
    if result["serving"]:
        lines += _serving_lines(result)
    lines += _task_lines(result.get("tasks", {}))
    for name, gate in result["quality_gate"].items():
        verdicts = ", ".join(
            f"{s}: {'pass' if v['raw']['passed'] else 'FAIL'} raw / "
            f"{'pass' if v['with_value_check']['passed'] else 'FAIL'} +check"
            for s, v in gate["sets"].items()
        )
        lines.append(
            f"Quality gate ({name}): raw {'PASSED' if gate['passed'] else 'FAILED'}, with the "
            f"value check {'PASSED' if gate['passed_with_value_check'] else 'FAILED'} "
            f"({verdicts}). Rule: {gate['rule']}."
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = result["text"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4), squeeze=False)
    for ax, (set_name, entry) in zip(axes[0], sets.items(), strict=True):
        rows = [(n, r) for n, r in entry["perplexity"].items() if n != "none"]
        for i, (name, row) in enumerate(rows):
            ps = [int(p) for p in row if p != "mean"]
            y = np.array([row[str(p)]["change"] for p in ps]) * 100
            lo = y - np.array([row[str(p)]["ci_low"] for p in ps]) * 100
            hi = np.array([row[str(p)]["ci_high"] for p in ps]) * 100 - y
            x = np.array(ps) * (1 + 0.04 * (i - 0.5))
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("symlog", linthresh=5)
        ax.set_xlabel("ahead position after the augmentation point")
        ax.set_ylabel("perplexity change vs no augmentation (%)")
        ax.set_title(f"{set_name} ({entry['n_docs']} docs), raw latents, 95% CI")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def text_set(
    models: dict[str, CoprocessorModel],
    tokenizer: Any,
    cfg: EvalConfig,
    docs: list[data.Document] | None,
    check: ValueCheck,
    policy: ValuePolicy,
) -> dict[str, Any]:
    """One text set's perplexity table, raw and as protected by the value check."""
    from coprocessor_worker.serving_eval import protected

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = held_out_windows(tokenizer, cfg, docs)
    nll, figures = per_point_nll(models, windows, cfg, pad, check, check.prompt_ids(tokenizer))
    base = nll["none"]
    guarded = {"none": base.mean(1)}
    served_fraction = {}
    for name in models:
        served = protected(figures[name], policy).reshape(base.shape[:2])
        guarded[name] = np.where(served[..., None], nll[name], base).mean(1)
        served_fraction[name] = float(served.mean())
    return {
        "n_docs": len(windows),
        "perplexity": relative_change_table({k: v.mean(1) for k, v in nll.items()}, cfg),
        "perplexity_with_value_check": relative_change_table(guarded, cfg),
        "served_fraction": served_fraction,
    }


def evaluate(
    models: dict[str, CoprocessorModel],
    tokenizer: Any,
    cfg: EvalConfig,
    out_dir: Path,
    tasks: list[str],
    docs: list[data.Document] | None = None,
    *,
    check: ValueCheck | None = None,
    policy: ValuePolicy | None = None,
) -> dict[str, Any]:
    """Run everything, write result.json, result.md and result.png into out_dir: held-out
    in-domain text (`docs`, default the bundled prose), the out-of-domain text, the QA and
    chat serving forms, each raw and with the value check, and the accuracy `tasks`."""
    from coprocessor_worker.serving_eval import serving_form, summarise

    check, policy = check or ValueCheck(), policy or ValuePolicy()
    out_dir.mkdir(parents=True, exist_ok=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.time()
    text = {"in_domain": text_set(models, tokenizer, cfg, docs, check, policy)}
    if cfg.n_ood_docs:
        ood_cfg = replace(cfg, n_docs=cfg.n_ood_docs)
        ood = data.out_of_domain_documents()
        text["out_of_domain"] = text_set(models, tokenizer, ood_cfg, ood, check, policy)
    serving = {}
    serving_sets: tuple[tuple[str, data.QAForm, Callable[[], list[data.QAItem]], int], ...] = (
        ("qa", "qa", data.qa_items, cfg.qa_items),  # QA and chat: the same held-out items
        ("chat", "chat", data.qa_items, cfg.qa_items),
        ("qa_out_of_domain", "qa", data.out_of_domain_qa_items, cfg.ood_qa_items),
    )
    for name, form, read_items, n in serving_sets:
        if n:
            items = read_items()
            order = np.random.default_rng(cfg.seed).permutation(len(items))[:n]
            scores = serving_form(models, tokenizer, [items[i] for i in order], form, check)
            serving[name] = summarise(scores, policy, cfg.n_bootstrap)
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "value_check": asdict(check),
        "value_policy": asdict(policy),
        "text": text,
        "serving": serving,
        "tasks": {t: task_accuracy(models, tokenizer, t, cfg, pad) for t in tasks},
    }
    result["quality_gate"] = {name: checkpoint_gate(result, name) for name in models}
    result["seconds"] = round(time.time() - t0, 1)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "result.md").write_text(markdown(result))
    plot(result, out_dir / "result.png")
    return result


def record_in_checkpoint(checkpoint_dir: Path, name: str, result: dict[str, Any]) -> None:
    """Write this model's evaluation and quality gate into the checkpoint's evaluation file
    (what the server reads to decide whether to apply its latents). The file is outside the
    checkpoint's fingerprint, so recording does not orphan stored payloads."""

    def mine(table: dict[str, Any]) -> dict[str, Any]:
        return {"this": table[name], "none": table["none"]}

    write_evaluation(
        Path(checkpoint_dir),
        {
            "text": {
                s: {
                    "n_docs": e["n_docs"],
                    "perplexity": mine(e["perplexity"]),
                    "perplexity_with_value_check": mine(e["perplexity_with_value_check"]),
                    "served_fraction": e["served_fraction"][name],
                }
                for s, e in result["text"].items()
            },
            "serving": {
                f: {"n": s["n"], "acc_none": s["acc_none"], **s[name]}
                for f, s in result["serving"].items()
            },
            "tasks": {t: mine(row) for t, row in result["tasks"].items()},
            "config": result["config"],
            "value_check": result["value_check"],
            "value_policy": result["value_policy"],
        },
        result["quality_gate"][name],
    )


def read_log(run_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(steps, evals) of a run's log.jsonl; after a resume, the last record of a step wins."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in (Path(run_dir) / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        (steps if rec["event"] == "step" else evals)[rec["step"]] = rec
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def plot_learning_curves(runs: dict[str, Path], path: Path) -> None:
    """Held-out relative perplexity change (mean over ahead positions, and at the largest
    logged position) against training step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, run in runs.items():
        _, evals = read_log(run)
        x = [e["step"] for e in evals]
        axes[0].plot(x, [100 * e["rel_ppl_change_mean"] for e in evals], marker="o", label=name)
        last = max(evals[0]["rel_ppl_change"], key=int)
        axes[1].plot(
            x, [100 * e["rel_ppl_change"][last] for e in evals], marker="o", label=f"{name} @{last}"
        )
    for ax, title in zip(axes, ("mean over ahead positions", "last ahead position"), strict=True):
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out ppl change vs no latents (%)")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
