"""The trained defaults for the bundled SmolLM2-135M-Instruct, committed beside this file:
the coprocessor (the serving default, deliberate/wiring.py) and its pause-token baseline."""

from __future__ import annotations

from pathlib import Path


def bundled_checkpoint_dir(method: str = "lora") -> Path:
    name = "smollm2-135m-instruct" + ("" if method == "lora" else f"-{method}")
    return Path(__file__).parent / name
