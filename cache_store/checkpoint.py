"""What a coprocessor checkpoint says about itself (`deliberate.json`), read without loading
any weights: the server needs the fingerprints, N_L and the quality gate, never the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_store.fingerprint import checkpoint_fingerprint

MANIFEST = "deliberate.json"

# Bound on the L2 norm of one latent when the manifest records none (`latent_norm_max`).
# Measured on the bundled SmolLM2-135M-Instruct coprocessor: 432 latents of 54 prefixes
# (32-400 tokens of this repository's docs) had norms 3.45-3.88 (mean 3.66); the pause
# baseline's are 3.26-3.65, and the decoder's own embedding rows are at most 7.49. 16 is
# about 4x the largest latent. A checkpoint for another decoder should record its own.
DEFAULT_LATENT_NORM_MAX = 16.0


class CheckpointMismatch(Exception):
    """A coprocessor checkpoint trained for another decoder; using it would produce garbage."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    fingerprint: str
    decoder_fingerprint: str
    method: str
    n_latents: int
    hidden_size: int
    gate_passed: bool
    gate_rule: str
    manifest: dict[str, Any]
    latent_norm_max: float = DEFAULT_LATENT_NORM_MAX
    """Largest L2 norm a served latent may have; payloads with a longer one are rejected."""

    @classmethod
    def read(cls, path: Path) -> CheckpointInfo:
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"{path} is not a coprocessor checkpoint (no {MANIFEST}); "
                "train one with `deliberate train` or omit --coprocessor for the bundled one"
            )
        manifest = json.loads(manifest_path.read_text())
        gate = manifest.get("quality_gate") or {}
        norm_max = float(manifest.get("latent_norm_max", DEFAULT_LATENT_NORM_MAX))
        if not norm_max > 0:
            raise ValueError(f"{manifest_path}: latent_norm_max must be positive, got {norm_max}")
        return cls(
            path=path,
            fingerprint=checkpoint_fingerprint(path),
            decoder_fingerprint=manifest["decoder_fingerprint"],
            method=manifest.get("method", "lora"),
            n_latents=int(manifest["n_latents"]),
            hidden_size=int(manifest["hidden_size"]),
            gate_passed=bool(gate.get("passed", False)),
            gate_rule=str(gate.get("rule", "no recorded evaluation")),
            manifest=manifest,
            latent_norm_max=norm_max,
        )

    def require_decoder(self, decoder_fingerprint: str) -> None:
        if decoder_fingerprint != self.decoder_fingerprint:
            raise CheckpointMismatch(
                f"coprocessor checkpoint {self.path} was trained for decoder "
                f"{self.decoder_fingerprint}, but the decoder in use is {decoder_fingerprint}. "
                "Use the decoder it was trained for, or train a coprocessor for this one "
                "(`deliberate train --model ...`)."
            )
