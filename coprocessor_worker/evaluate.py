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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coprocessor_worker import data
from coprocessor_worker.coprocessor import CoprocessorModel

POSITIONS = (1, 2, 4, 8, 16)
GATE_POSITIONS = (8, 16)
GATE_EPSILON = 0.01
GATE_RULE = (
    "passed iff at ahead positions 8 and 16 the relative perplexity change against no "
    "augmentation is <= 0 and the upper end of its 95% bootstrap CI over held-out documents "
    f"is <= +{GATE_EPSILON:.0%}"
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
def per_document_nll(
    models: dict[str, CoprocessorModel],
    windows: list[tuple[np.ndarray, np.ndarray]],
    cfg: EvalConfig,
    pad_id: int,
) -> dict[str, np.ndarray]:
    """NLL per (document, ahead position), averaged over the document's augmentation points:
    {"none": [D, A], name: [D, A], ...}."""
    from tqdm import tqdm

    first = next(iter(models.values()))
    out: dict[str, list[np.ndarray]] = {"none": [], **{name: [] for name in models}}
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
            out[name].append(nll.mean(1).numpy())
        out["none"].append(base.mean(1).numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


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
    values = {str(p): row[str(p)] for p in GATE_POSITIONS if str(p) in row}
    passed = len(values) == len(GATE_POSITIONS) and all(
        v["change"] <= 0 and v["ci_high"] <= GATE_EPSILON for v in values.values()
    )
    return {"passed": bool(passed), "rule": GATE_RULE, "values": values}


# --- 2. multiple choice and LAMBADA ------------------------------------------------------------


@torch.no_grad()
def continuation_logprobs(
    model: CoprocessorModel,
    prefix: tuple,
    p: int,
    conts: list[list[int]],
    use_latents: bool,
    pad_id: int,
) -> list[np.ndarray]:
    """Log-probabilities of each continuation's tokens after a prefix of p tokens, all
    continuations scored at once as K groups at the same point (with latents or without)."""
    kv, last_hidden = prefix
    k, longest = len(conts), max(len(c) for c in conts)
    tgt = torch.full((1, k, longest), pad_id, dtype=torch.long)
    for i, c in enumerate(conts):
        tgt[0, i, : len(c)] = torch.tensor(c)
    lens = torch.full((1, k), p, dtype=torch.long)
    inputs = model.embed(tgt[:, :, :-1])
    if use_latents:
        lat = model.latents_at(kv, lens).to(inputs.dtype)
        states = model.decode_groups(kv, lens, torch.cat([lat, inputs], dim=2))
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
            model = first if m == "none" else models[m]
            scores = continuation_logprobs(model, prefix, len(ctx), conts, m != "none", pad_id)
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


def markdown(result: dict[str, Any]) -> str:
    table = result["perplexity"]
    positions = [p for p in table["none"]]
    lines = [
        f"Relative perplexity change against no augmentation at each ahead position "
        f"({result['n_docs']} held-out documents x {result['config']['positions_per_doc']} "
        "points; 95% bootstrap CI over documents):",
        "",
        "| method | "
        + " | ".join(f"pos {p}" for p in positions)
        + " | mean 1-"
        + f"{positions[-1]} |",
        "|---" * (len(positions) + 2) + "|",
    ]
    for name, row in table.items():
        if name == "none":
            continue
        cells = [
            f"{row[p]['change']:+.2%} ({row[p]['ci_low']:+.1%}..{row[p]['ci_high']:+.1%})"
            for p in [*positions, "mean"]
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| none (ppl) | " + " | ".join(f"{table['none'][p]['ppl']:.1f}" for p in positions) + " | |"
    )
    if result.get("tasks"):
        methods = list(next(iter(result["tasks"].values())))
        lines += ["", "| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        for task, row in result["tasks"].items():
            lines.append(
                f"| {task} (n={row[methods[0]]['n']}) | "
                + " | ".join(f"{row[m]['acc']:.3f}" for m in methods)
                + " |"
            )
            if "acc_norm" in row[methods[0]]:
                lines.append(
                    f"| {task} acc_norm | "
                    + " | ".join(f"{row[m]['acc_norm']:.3f}" for m in methods)
                    + " |"
                )
    for name, gate in result.get("quality_gate", {}).items():
        lines += [
            "",
            f"Quality gate ({name}): {'PASSED' if gate['passed'] else 'FAILED'}: {gate['rule']}.",
        ]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = result["perplexity"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, row) in enumerate((n, r) for n, r in table.items() if n != "none"):
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
    ax.set_title(f"Held-out ({result['n_docs']} docs), 95% bootstrap CI")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(
    models: dict[str, CoprocessorModel],
    tokenizer: Any,
    cfg: EvalConfig,
    out_dir: Path,
    tasks: list[str],
    docs: list[data.Document] | None = None,
) -> dict[str, Any]:
    """Run everything, write result.json, result.md and result.png into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    t0 = time.time()
    windows = held_out_windows(tokenizer, cfg, docs)
    nll = per_document_nll(models, windows, cfg, pad)
    table = relative_change_table(nll, cfg)
    result: dict[str, Any] = {
        "config": cfg.__dict__,
        "n_docs": len(windows),
        "perplexity": table,
        "quality_gate": {name: quality_gate(table[name]) for name in models},
    }
    result["tasks"] = {t: task_accuracy(models, tokenizer, t, cfg, pad) for t in tasks}
    result["seconds"] = round(time.time() - t0, 1)
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "result.md").write_text(markdown(result))
    plot(result, out_dir / "result.png")
    return result


def record_in_checkpoint(checkpoint_dir: Path, name: str, result: dict[str, Any]) -> None:
    """Write this model's evaluation and quality gate into its deliberate.json (what the
    server reads to decide whether to apply its latents)."""
    path = Path(checkpoint_dir) / "deliberate.json"
    meta = json.loads(path.read_text())
    meta["evaluation"] = {
        "held_out_perplexity_change": result["perplexity"][name],
        "baseline": result["perplexity"]["none"],
        "n_docs": result["n_docs"],
        "tasks": {
            t: {"this": row[name], "none": row["none"]} for t, row in result["tasks"].items()
        },
        "others": {k: v for k, v in result["perplexity"].items() if k not in (name, "none")},
        "config": result["config"],
    }
    meta["quality_gate"] = result["quality_gate"][name]
    path.write_text(json.dumps(meta, indent=2) + "\n")


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
