"""Training loop for the coprocessor and the pause-token baseline (same loop, same data).

One step: B rows of T tokens of prose (coprocessor_worker/data.py); K augmentation points per
row; one no-grad decoder pass per row gives the cache shared by its K groups; the coprocessor
and the decoder each run once over all K groups (see model.py). Loss: mean NLL of the
N_A ahead tokens (with --kl-weight, plus that weight times the KL from the plain decoder's
next-token distributions there: a do-no-harm term). With --qa-rows, each step also trains
on rows in the serving form (passage, question, answer; latents after the passage, loss on
the answer's tokens).
AdamW, linear warmup then cosine decay to `min_lr_ratio`, gradient clipping and
accumulation, bf16 autocast with frozen weights stored in bf16.

Everything needed to resume sits in `<out>/last/`: the checkpoint, the optimizer state (as
safetensors, never pickle) and the step. Batches are a pure function of (seed, step), so a
resumed run sees exactly the batches it would have seen. The best checkpoint by held-out
loss is kept in `<out>/best/`; `<out>/log.jsonl` has one line per step and per evaluation.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coprocessor_worker import data
from coprocessor_worker.checkpoint_io import (
    check_decoder,
    load_trainable_state,
    read_checkpoint_state,
    read_meta,
    save_checkpoint,
)
from coprocessor_worker.model import (
    CoprocessorConfig,
    CoprocessorModel,
    build_model,
    load_decoder,
    torch_dtype,
)
from coprocessor_worker.train_config import TrainConfig


@torch.no_grad()
def held_out_nll(model: CoprocessorModel, batches, n_ahead: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-ahead-position mean NLL [n_ahead] with latents, and of the plain decoder."""
    nll, base = [], []
    for ids, pos in batches:
        a, b = model.packed_nll(torch.from_numpy(ids), torch.from_numpy(pos), n_ahead)
        nll.append(a.reshape(-1, n_ahead))
        base.append(b.reshape(-1, n_ahead))
    return torch.cat(nll).mean(0).numpy(), torch.cat(base).mean(0).numpy()


def evaluate_held_out(model: CoprocessorModel, batches, cfg: TrainConfig, step: int) -> dict:
    """The loop's held-out record: NLL with and without latents, relative change per position."""
    t0 = time.time()
    nll, base = held_out_nll(model, batches, cfg.n_ahead)
    rel = {str(j): float(math.exp(nll[j - 1] - base[j - 1]) - 1) for j in (1, 2, 4, 8, 16)
           if j <= cfg.n_ahead}  # fmt: skip
    return {
        "event": "eval",
        "step": step,
        "held_out_nll": float(nll.mean()),
        "baseline_nll": float(base.mean()),
        "rel_ppl_change": rel,
        "rel_ppl_change_mean": float(math.exp(nll.mean() - base.mean()) - 1),
        "seconds": round(time.time() - t0, 1),
        "time": time.time(),
    }


def log_evaluation(model: CoprocessorModel, batches, cfg: TrainConfig, step: int, log) -> float:
    """Evaluate on the held-out rows, log the record (file and console); the held-out NLL."""
    from tqdm import tqdm

    record = evaluate_held_out(model, batches, cfg, step)
    log.write(json.dumps(record) + "\n")
    log.flush()
    tqdm.write(
        f"step {step}: held-out NLL {record['held_out_nll']:.4f} "
        f"(plain {record['baseline_nll']:.4f}), rel ppl change "
        f"{record['rel_ppl_change_mean']:+.2%}; "
        + " ".join(f"@{k} {v:+.1%}" for k, v in record["rel_ppl_change"].items())
    )
    return record["held_out_nll"]


def step_loss(model: CoprocessorModel, cfg: TrainConfig, windows, qa_rows, step: int):
    """Backpropagate one optimizer step's loss; returns (loss, plain decoder's loss, tokens)."""
    total, plain, tokens = 0.0, 0.0, 0
    for micro in range(cfg.grad_accum):
        ids, pos = (torch.from_numpy(a) for a in data.step_batch(cfg, windows, step, micro))
        if cfg.kl_weight:
            nll, base, kl = model.packed_nll_and_kl(ids, pos, cfg.n_ahead)
            loss = (nll.mean() + cfg.kl_weight * kl.mean()) / cfg.grad_accum
        else:
            nll, base = model.packed_nll(ids, pos, cfg.n_ahead)
            loss = nll.mean() / cfg.grad_accum
        loss.backward()
        total += float(loss.detach())
        plain += float(base.mean()) / cfg.grad_accum
        tokens += ids.numel() + pos.numel() * group_tokens(cfg, cfg.n_ahead)
    if qa_rows is not None:
        ids, pos, weights = (torch.from_numpy(a) for a in data.qa_batch(cfg, qa_rows, step))
        nll, _ = model.packed_nll(ids, pos, weights.shape[-1])
        # The answer's mean NLL: what the serving-form evaluation scores.
        loss = cfg.qa_weight * (nll * weights).sum() / weights.sum()
        loss.backward()
        total += float(loss.detach())
        tokens += ids.numel() + pos.numel() * group_tokens(cfg, weights.shape[-1])
    return total, plain, tokens


def group_tokens(cfg: TrainConfig, n_ahead: int) -> int:
    """Tokens through the three passes per augmentation point: the coprocessor's soft
    tokens, then the latents and the ahead tokens fed back through the decoder."""
    return cfg.n_latents * (cfg.method != "pause") + cfg.n_latents + n_ahead - 1


def start_from(
    model: CoprocessorModel, checkpoint: Path, decoder_dir: Path, decoder_fp: str
) -> None:
    """Warm start: every trained tensor of a checkpoint of the same method and shape, or only
    the latent base of a pause-token checkpoint (a coprocessor starting as trained pauses)."""
    meta = read_meta(checkpoint)
    check_decoder(meta, decoder_dir, checkpoint, actual=decoder_fp)
    state = read_checkpoint_state(checkpoint)
    if meta["method"] == model.config.method:
        trained = CoprocessorConfig.from_dict(meta["coprocessor"]).n_latents
        if trained != model.config.n_latents:
            raise ValueError(
                f"{checkpoint} has {trained} latents, this run "
                f"{model.config.n_latents}: pass --n-latents {trained}"
            )
        load_trainable_state(model, state)
    elif meta["method"] == "pause":
        with torch.no_grad():
            model.base.copy_(state["base"])
    else:
        raise ValueError(
            f"cannot start a {model.config.method} run from a {meta['method']} checkpoint "
            f"({checkpoint}); use one of the same method, or a pause-token checkpoint"
        )


# --- optimizer state as safetensors ------------------------------------------------------


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for i, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            out[f"{i}.{name}"] = torch.as_tensor(value).float().contiguous().clone()
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def make_optimizer(model: CoprocessorModel, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable groups, each at its own peak learning rate."""
    lrs = {"lora": cfg.lr, "embed": cfg.lr_embed, "proj": cfg.lr_proj}
    groups = model.trainable_parameters()
    return torch.optim.AdamW(
        [{"params": ps, "lr": lrs[g], "name": g} for g, ps in groups.items() if ps],
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
    )


def resume_run(
    last: Path, model: CoprocessorModel, opt: torch.optim.Optimizer
) -> tuple[int, float]:
    """(step, best held-out NLL) of the run saved in `last`, its tensors and optimizer state
    loaded; (0, inf) for a new run."""
    from safetensors.torch import load_file

    if not (last / "trainer_state.json").is_file():
        return 0, float("inf")
    state = json.loads((last / "trainer_state.json").read_text())
    load_trainable_state(model, read_checkpoint_state(last))
    _load_optimizer_tensors(opt, load_file(str(last / "optimizer.safetensors")))
    step, best = int(state["step"]), float(state["best"])
    print(f"resumed from {last} at step {step} (best held-out NLL {best:.4f})")
    return step, best


def save_at(folder: Path, model, step: int, decoder_fp: str, cfg: TrainConfig, **extra) -> Path:
    """A checkpoint of the run at `step` (best/, step-N/, last/), its config and step recorded."""
    training = {"config": asdict(cfg), "step": step, **extra}
    return save_checkpoint(model, folder, decoder_fingerprint=decoder_fp, training=training)


def save_run_state(
    out: Path,
    model,
    opt,
    step: int,
    decoder_fp: str,
    cfg: TrainConfig,
    best: float,
    extra: dict[str, Any],
) -> None:
    """Everything a resumed run needs in `out/last`: checkpoint, optimizer state, step."""
    from safetensors.torch import save_file

    target = save_at(out / "last", model, step, decoder_fp, cfg, **extra)
    save_file(_optimizer_tensors(opt), str(target / "optimizer.safetensors"))
    (target / "trainer_state.json").write_text(json.dumps({"step": step, "best": best}))


# --- the loop ----------------------------------------------------------------------------


def train(cfg: TrainConfig, decoder_dir: Path, out: Path, *, resume: bool = True) -> Path:
    """Train (or resume) into `out`; returns the best checkpoint folder."""
    from tqdm import tqdm

    from cache_store.fingerprint import decoder_fingerprint

    # model, optimizer, data
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    compute = torch_dtype(cfg.dtype)
    decoder, tokenizer = load_decoder(decoder_dir, compute)  # frozen weights in compute dtype
    decoder_fp = decoder_fingerprint(decoder_dir)
    model = build_model(decoder, tokenizer, cfg.coprocessor_config(), compute)
    if cfg.init_from:
        start_from(model, Path(cfg.init_from), decoder_dir, decoder_fp)
    opt = make_optimizer(model, cfg)
    base_lrs = [g["lr"] for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]
    train_rows, held_rows = data.load_windows(cfg, tokenizer, out)
    qa_rows = data.load_qa_rows(cfg, tokenizer, out) if cfg.qa_rows else None
    eval_batches = data.held_out_batches(cfg, held_rows)

    step, best = resume_run(out / "last", model, opt) if resume else (0, float("inf"))
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = (out / "log.jsonl").open("a")
    print(
        f"{cfg.method}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable; "
        f"{len(train_rows)} train rows, {len(held_rows)} held-out ({cfg.windows})"
        + (f", {len(qa_rows)} QA rows" if qa_rows is not None else "")
    )

    if step == 0:
        best = min(best, log_evaluation(model, eval_batches, cfg, 0, log))
        save_at(out / "best", model, 0, decoder_fp, cfg, held_out_nll=best)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.method}", unit="step")
    started = time.time()
    while step < cfg.steps:
        t0 = time.time()
        factor = lr_factor(cfg, step)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        loss, plain, tokens = step_loss(model, cfg, train_rows, qa_rows, step)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        record = {
            "event": "step",
            "step": step,
            "loss": round(loss, 5),
            "baseline_loss": round(plain, 5),
            "lr": base_lrs[0] * factor,
            "grad_norm": round(grad_norm, 4),
            "seconds": round(dt, 3),
            "tokens_per_s": round(tokens / dt, 1),
            "time": time.time(),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.update()
        bar.set_postfix(loss=f"{loss:.3f}", plain=f"{plain:.3f}", tok_s=f"{tokens / dt:.0f}")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            held_out = log_evaluation(model, eval_batches, cfg, step, log)
            if held_out < best:
                best = held_out
                save_at(out / "best", model, step, decoder_fp, cfg, held_out_nll=best)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_at(out / f"step-{step}", model, step, decoder_fp, cfg)
        if step % cfg.save_every == 0 or step == cfg.steps:
            extra = {"train_seconds_this_session": round(time.time() - started, 1)}
            save_run_state(out, model, opt, step, decoder_fp, cfg, best, extra)
    bar.close()
    log.close()
    return out / "best"
