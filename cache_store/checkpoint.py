"""What a coprocessor checkpoint says about itself (`deliberate.json`), read without loading
any weights: the server needs the fingerprints, N_L and the quality gate, never the model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_store.fingerprint import checkpoint_fingerprint

MANIFEST = "deliberate.json"


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
        )

    def require_decoder(self, decoder_fingerprint: str) -> None:
        if decoder_fingerprint != self.decoder_fingerprint:
            raise CheckpointMismatch(
                f"coprocessor checkpoint {self.path} was trained for decoder "
                f"{self.decoder_fingerprint}, but the decoder in use is {decoder_fingerprint}. "
                "Use the decoder it was trained for, or train a coprocessor for this one "
                "(`deliberate train --model ...`)."
            )
