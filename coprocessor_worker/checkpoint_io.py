"""Checkpoint files of a coprocessor: the trained tensors as safetensors (LoRA in peft's own
layout), the manifest `deliberate.json` and the recorded `evaluation.json`, both owned by
cache_store/checkpoint.py (the server reads them too, without torch). Loading refuses a
checkpoint trained for another decoder."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from cache_store.checkpoint import (
    EVALUATION,
    FORMAT_VERSION,
    MANIFEST,
    CheckpointMismatch,
    read_manifest,
)
from coprocessor_worker.model import CoprocessorConfig, CoprocessorModel, build_model, load_decoder

EXTRA_FILE = "latents.safetensors"
ADAPTER_FILE = "adapter_model.safetensors"
FULL_FILE = "coprocessor.safetensors"


def trainable_state(model: CoprocessorModel) -> dict[str, torch.Tensor]:
    """Every trained tensor by name (LoRA under its peft name), fp32, contiguous."""
    state: dict[str, torch.Tensor] = {"base": model.base.detach()}
    if model.config.method != "pause":
        state["soft_tokens"] = model.soft_tokens.detach()
        state["proj.weight"] = model.proj.weight.detach()
        if model.peft is not None:
            from peft import get_peft_model_state_dict

            for name, t in get_peft_model_state_dict(model.peft).items():
                state["lora/" + name] = t.detach()
        elif model.full_copy is not None:
            for name, t in model.full_copy.state_dict().items():
                state["full/" + name] = t.detach()
    return {k: v.float().contiguous().clone() for k, v in state.items()}


def load_trainable_state(model: CoprocessorModel, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.base.copy_(state["base"])
        if model.config.method == "pause":
            return
        model.soft_tokens.copy_(state["soft_tokens"])
        model.proj.weight.copy_(state["proj.weight"])
        if model.peft is not None:
            from peft import set_peft_model_state_dict

            lora = {k[len("lora/") :]: v for k, v in state.items() if k.startswith("lora/")}
            result = set_peft_model_state_dict(model.peft, lora)
            if getattr(result, "unexpected_keys", None):
                raise ValueError(f"unexpected LoRA tensors: {result.unexpected_keys[:5]}")
        elif model.full_copy is not None:
            full = {k[len("full/") :]: v for k, v in state.items() if k.startswith("full/")}
            model.full_copy.load_state_dict(full, strict=True)


def save_checkpoint(
    model: CoprocessorModel,
    out_dir: Path,
    *,
    decoder_fingerprint: str,
    training: dict[str, Any] | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder (safetensors + deliberate.json) atomically. It has no
    evaluation yet (`evaluate.record_in_checkpoint` adds one), so its gate fails."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    state = trainable_state(model)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        latents = {k: v for k, v in state.items() if not k.startswith(("lora/", "full/"))}
        save_file(latents, str(tmp / EXTRA_FILE))
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora/")}
        if lora:
            save_file(lora, str(tmp / ADAPTER_FILE))
            # peft's own adapter_config.json, so `PeftModel.from_pretrained` can read it too.
            model.peft.peft_config["default"].save_pretrained(str(tmp))  # type: ignore[union-attr]
        full = {k[5:]: v for k, v in state.items() if k.startswith("full/")}
        if full:
            save_file(full, str(tmp / FULL_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "method": model.config.method,
            "decoder_fingerprint": decoder_fingerprint,
            "n_latents": model.config.n_inserted,  # what the server inserts
            "hidden_size": model.hidden_size,
            "coprocessor": asdict(model.config),
            "training": training or {},
            **(extra_meta or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_meta(checkpoint_dir: Path) -> dict[str, Any]:
    """The manifest, checked as the server checks it (cache_store.checkpoint owns it)."""
    return read_manifest(Path(checkpoint_dir))


def read_checkpoint_state(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    root = Path(checkpoint_dir)
    state = dict(load_file(str(root / EXTRA_FILE)))
    if (root / ADAPTER_FILE).is_file():
        state.update({"lora/" + k: v for k, v in load_file(str(root / ADAPTER_FILE)).items()})
    if (root / FULL_FILE).is_file():
        state.update({"full/" + k: v for k, v in load_file(str(root / FULL_FILE)).items()})
    return state


def check_decoder(
    meta: dict[str, Any], decoder_dir: Path, checkpoint_dir: Path, *, actual: str | None = None
) -> str:
    """The decoder's fingerprint (`actual` if the caller already hashed it), refusing a
    checkpoint trained for another decoder."""
    from cache_store.fingerprint import decoder_fingerprint

    actual = actual or decoder_fingerprint(decoder_dir)
    if meta["decoder_fingerprint"] != actual:
        raise CheckpointMismatch(
            f"coprocessor checkpoint {checkpoint_dir} was trained for decoder "
            f"{meta['decoder_fingerprint']}, but {decoder_dir} has fingerprint {actual}: "
            "its latents would be garbage for this decoder. Train one for it (`deliberate train`)."
        )
    return actual


def load_model(
    checkpoint_dir: Path,
    decoder_dir: Path,
    *,
    compute_dtype: torch.dtype = torch.bfloat16,
    weights_dtype: torch.dtype | None = None,
) -> tuple[CoprocessorModel, dict[str, Any], Any]:
    """A trained CoprocessorModel from a checkpoint, refusing another decoder's checkpoint."""
    meta = read_meta(checkpoint_dir)
    check_decoder(meta, decoder_dir, checkpoint_dir)
    decoder, tokenizer = load_decoder(decoder_dir, weights_dtype or compute_dtype)
    model = build_model(
        decoder, tokenizer, CoprocessorConfig.from_dict(meta["coprocessor"]), compute_dtype
    )
    load_trainable_state(model, read_checkpoint_state(checkpoint_dir))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, meta, tokenizer


def export_checkpoint(src: Path, dst: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Copy a run's checkpoint without its optimizer state, tensors cast to `dtype` (bf16
    halves the adapter's size; the model computes in fp32 after loading either way)."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    read_meta(src)  # refuse anything that is not a checkpoint
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in (EXTRA_FILE, ADAPTER_FILE, FULL_FILE):
        if (src / name).is_file():
            tensors = {k: v.to(dtype).contiguous() for k, v in load_file(str(src / name)).items()}
            save_file(tensors, str(dst / name))
    for name in (MANIFEST, EVALUATION, "adapter_config.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst
