"""Training loop for the coprocessor and the pause-token baseline (same loop, same data).

One step: B windows of T tokens; K augmentation positions per window; one no-grad decoder
pass per window gives the cache shared by its K groups; the coprocessor and the decoder each
run once over all K groups (see coprocessor.py). Loss: mean NLL of the N_A ahead tokens.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coprocessor_worker.coprocessor import (
    CoprocessorModel,
    build_model,
    check_decoder,
    load_decoder,
    load_trainable_state,
    read_checkpoint_state,
    read_meta,
    resolve_dtype,
    save_checkpoint,
)
from coprocessor_worker.train_config import TrainConfig

# --- data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Windows:
    """Rows of token ids [n, window] and how many tokens of each row are text [n]."""

    ids: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def load_windows(cfg: TrainConfig, tokenizer: Any, cache_dir: Path) -> tuple[Windows, Windows]:
    """(train, held-out) windows, cached as .npz (no pickle)."""
    from coprocessor_worker import data

    # a document row needs room for K distinct points, each followed by n_ahead tokens
    shortest = cfg.min_prefix + cfg.n_ahead + cfg.positions - 1
    tag = f"{'corpus' if cfg.corpus else 'bundled'}-{cfg.windows}-w{cfg.window}"
    if cfg.windows == "documents":
        tag += f"-min{shortest}"  # rows were filtered for this K and N_A
    paths = {s: cache_dir / f"windows-{tag}-{s}.npz" for s in ("train", "held_out")}
    if not all(p.is_file() for p in paths.values()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        for split, path in paths.items():
            if cfg.corpus:
                docs = data.corpus_documents(cfg.corpus, split, text_field=cfg.text_field)
            else:
                docs = data.bundled_documents(split)
            if not docs:
                raise ValueError(
                    f"the {split} split of the corpus is empty: documents are assigned to it "
                    "by a hash of their text (10% held out), so give more documents"
                )
            tokens = data.tokenize_documents(docs, tokenizer)
            if cfg.windows == "stream":
                ids = data.pack_windows(tokens, cfg.window, eos)
                lengths = np.full(len(ids), cfg.window, dtype=np.int64)
            else:
                ids, lengths = data.document_windows(tokens, cfg.window, shortest, eos)
            np.savez(path, ids=ids, lengths=lengths)
    loaded = []
    for path in paths.values():
        with np.load(path, allow_pickle=False) as f:
            loaded.append(Windows(f["ids"], f["lengths"]))
    return loaded[0], loaded[1]


def sample_positions(rng: np.random.Generator, cfg: TrainConfig, lengths: np.ndarray) -> np.ndarray:
    """[n, K] sorted distinct prefix lengths in [min_prefix, length - n_ahead] per row."""
    rows = [
        np.sort(
            rng.choice(np.arange(cfg.min_prefix, n - cfg.n_ahead + 1), cfg.positions, replace=False)
        )
        for n in lengths
    ]
    return np.stack(rows)


def _rows(windows: Windows, idx: np.ndarray, positions: np.ndarray):
    """The rows idx, cut after their longest text: padding costs a forward pass too."""
    longest = int(windows.lengths[idx].max())
    return torch.from_numpy(windows.ids[idx, :longest]), torch.from_numpy(positions)


def batch_for_step(cfg: TrainConfig, windows: Windows, step: int, micro: int):
    """The batch of (step, micro-step): a pure function of the seed, so resume is exact."""
    rng = np.random.default_rng([cfg.seed, step, micro])
    idx = rng.choice(len(windows), cfg.batch_windows, replace=False)
    return _rows(windows, idx, sample_positions(rng, cfg, windows.lengths[idx]))


def held_out_batches(cfg: TrainConfig, windows: Windows) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng([cfg.seed, 10**9])
    idx = rng.choice(len(windows), min(cfg.eval_windows, len(windows)), replace=False)
    positions = sample_positions(rng, cfg, windows.lengths[idx])
    return [
        _rows(windows, idx[i : i + cfg.batch_windows], positions[i : i + cfg.batch_windows])
        for i in range(0, len(idx), cfg.batch_windows)
    ]


@torch.no_grad()
def held_out_nll(model: CoprocessorModel, batches, n_ahead: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-ahead-position mean NLL [n_ahead] with latents, and of the plain decoder."""
    nll, base = [], []
    for ids, pos in batches:
        a, b = model.packed_nll(ids, pos, n_ahead)
        nll.append(a.reshape(-1, n_ahead))
        base.append(b.reshape(-1, n_ahead))
    return torch.cat(nll).mean(0).numpy(), torch.cat(base).mean(0).numpy()


def start_from(
    model: CoprocessorModel, checkpoint: Path, decoder_dir: Path, decoder_fp: str
) -> None:
    """Warm start: every trained tensor of a checkpoint of the same method and shape, or only
    the latent base of a pause-token checkpoint (a coprocessor starting as trained pauses)."""
    meta = read_meta(checkpoint)
    check_decoder(meta, decoder_dir, checkpoint, actual=decoder_fp)
    state = read_checkpoint_state(checkpoint)
    if meta["method"] == model.config.method:
        if meta["n_latents"] != model.config.n_latents:
            raise ValueError(
                f"{checkpoint} has {meta['n_latents']} latents, this run "
                f"{model.config.n_latents}: pass --n-latents {meta['n_latents']}"
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
    from safetensors.torch import save_file

    target = save_checkpoint(
        model,
        out / "last",
        decoder_fingerprint=decoder_fp,
        training={"config": asdict(cfg), "step": step, **extra},
    )
    save_file(_optimizer_tensors(opt), str(target / "optimizer.safetensors"))
    (target / "trainer_state.json").write_text(json.dumps({"step": step, "best": best}))


# --- the loop ----------------------------------------------------------------------------


def train(cfg: TrainConfig, decoder_dir: Path, out: Path, *, resume: bool = True) -> Path:
    """Train (or resume) into `out`; returns the best checkpoint folder."""
    from safetensors.torch import load_file
    from tqdm import tqdm

    from cache_store.fingerprint import decoder_fingerprint

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    compute = resolve_dtype(cfg.dtype)
    decoder, tokenizer = load_decoder(decoder_dir, compute)  # frozen weights in compute dtype
    decoder_fp = decoder_fingerprint(decoder_dir)
    model = build_model(decoder, tokenizer, cfg.coprocessor_config(), compute)
    if cfg.init_from:
        start_from(model, Path(cfg.init_from), decoder_dir, decoder_fp)
    groups = model.trainable_parameters()
    lrs = {"lora": cfg.lr, "embed": cfg.lr_embed, "proj": cfg.lr_proj}
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": lrs[g], "name": g} for g, ps in groups.items() if ps],
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
    )
    base_lrs = [g["lr"] for g in opt.param_groups]
    params = [p for g in opt.param_groups for p in g["params"]]

    train_w, held_w = load_windows(cfg, tokenizer, out)
    eval_batches = held_out_batches(cfg, held_w)
    step, best = 0, float("inf")
    last = out / "last"
    if resume and (last / "trainer_state.json").is_file():
        state = json.loads((last / "trainer_state.json").read_text())
        load_trainable_state(model, read_checkpoint_state(last))
        _load_optimizer_tensors(opt, load_file(str(last / "optimizer.safetensors")))
        step, best = int(state["step"]), float(state["best"])
        print(f"resumed from {last} at step {step} (best held-out NLL {best:.4f})")
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    log = (out / "log.jsonl").open("a")
    n_trainable = sum(p.numel() for p in params)
    # tokens through the three passes per augmentation point: the coprocessor's soft tokens,
    # then the latents and the ahead tokens fed back through the decoder
    group_tokens = cfg.n_latents * (cfg.method != "pause") + cfg.n_latents + cfg.n_ahead - 1
    print(
        f"{cfg.method}: {n_trainable / 1e6:.2f}M trainable; {len(train_w)} train windows, "
        f"{len(held_w)} held-out ({cfg.windows}); {group_tokens} tokens per point"
    )

    def evaluate(at_step: int) -> float:
        nonlocal best
        t0 = time.time()
        nll, base = held_out_nll(model, eval_batches, cfg.n_ahead)
        mean = float(nll.mean())
        rel = {
            str(j): float(math.exp(nll[j - 1] - base[j - 1]) - 1)
            for j in (1, 2, 4, 8, 16)
            if j <= cfg.n_ahead
        }
        record = {
            "event": "eval",
            "step": at_step,
            "held_out_nll": mean,
            "baseline_nll": float(base.mean()),
            "rel_ppl_change": rel,
            "rel_ppl_change_mean": float(math.exp(mean - base.mean()) - 1),
            "seconds": round(time.time() - t0, 1),
            "time": time.time(),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        if mean < best:
            best = mean
            save_checkpoint(
                model,
                out / "best",
                decoder_fingerprint=decoder_fp,
                training={
                    "config": asdict(cfg),
                    "step": at_step,
                    "held_out_nll": mean,
                    "baseline_nll": float(base.mean()),
                },
            )
        tqdm.write(
            f"step {at_step}: held-out NLL {mean:.4f} (plain {base.mean():.4f}), "
            f"rel ppl change {record['rel_ppl_change_mean']:+.2%}; "
            + " ".join(f"@{k} {v:+.1%}" for k, v in rel.items())
        )
        return mean

    if step == 0:
        evaluate(0)
    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.method}", unit="step")
    started = time.time()
    while step < cfg.steps:
        t0 = time.time()
        factor = lr_factor(cfg, step)
        for g, lr in zip(opt.param_groups, base_lrs, strict=True):
            g["lr"] = lr * factor
        total, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            ids, pos = batch_for_step(cfg, train_w, step, micro)
            tokens += ids.numel() + pos.numel() * group_tokens
            nll, base = model.packed_nll(ids, pos, cfg.n_ahead)
            loss = nll.mean() / cfg.grad_accum
            loss.backward()
            total += float(loss.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        record = {
            "event": "step",
            "step": step,
            "loss": round(total, 5),
            "baseline_loss": round(float(base.mean()), 5),
            "lr": base_lrs[0] * factor,
            "grad_norm": round(grad_norm, 4),
            "seconds": round(dt, 3),
            "tokens_per_s": round(tokens / dt, 1),
            "ahead_tokens_per_s": round(
                cfg.grad_accum * cfg.batch_windows * cfg.positions * cfg.n_ahead / dt, 1
            ),
            "time": time.time(),
        }
        log.write(json.dumps(record) + "\n")
        log.flush()
        bar.update()
        bar.set_postfix(
            loss=f"{total:.3f}",
            plain=f"{float(base.mean()):.3f}",
            tok_s=f"{tokens / dt:.0f}",
        )
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evaluate(step)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_checkpoint(
                model,
                out / f"step-{step}",
                decoder_fingerprint=decoder_fp,
                training={"config": asdict(cfg), "step": step},
            )
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_run_state(
                out,
                model,
                opt,
                step,
                decoder_fp,
                cfg,
                best,
                {"train_seconds_this_session": round(time.time() - started, 1)},
            )
    bar.close()
    log.close()
    return out / "best"
