"""The trained checkpoints for the bundled SmolLM2-135M-Instruct, committed beside this file
(model card: docs/coprocessor.md):
- "lora": the coprocessor, the serving default (deliberate/wiring.py); its latents replace
  the context's last N_L token embeddings (`--placement replace_tail`);
- "pause": its pause-token baseline, trained by the same loop;
- "insert": the paper's placement (latents inserted after the context), the default until
  session 8, kept as the reference the value check's end-to-end test is picked for."""

from __future__ import annotations

from pathlib import Path


def bundled_checkpoint_dir(name: str = "lora") -> Path:
    suffix = "" if name == "lora" else f"-{name}"
    return Path(__file__).parent / f"smollm2-135m-instruct{suffix}"
