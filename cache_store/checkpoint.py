"""What a coprocessor checkpoint says about itself, read without loading any weights: the
server needs the fingerprints, N_L and the quality gate, never the model.

A checkpoint folder holds safetensors tensors, `deliberate.json` (the manifest: format
version, method, the fingerprint of the decoder it was trained for, N_L, the coprocessor's
config with the latents' placement, training config)
and `evaluation.json` (its recorded held-out evaluation and quality gate). This module owns
both files' names, the format version and the checks on reading; the worker's loader reads
manifests through it too, so the server and the worker cannot disagree on what a valid
checkpoint is. The evaluation file is outside the checkpoint's fingerprint
(cache_store.fingerprint): recording an evaluation changes no prefix key, so it orphans no
stored payload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_store.fingerprint import checkpoint_fingerprint

MANIFEST = "deliberate.json"
EVALUATION = "evaluation.json"
FORMAT_VERSION = 1
NOT_EVALUATED = {"passed": False, "passed_with_value_check": False, "rule": "not evaluated yet"}

# Bound on the L2 norm of one latent when the manifest records none (`latent_norm_max`).
# Measured on the bundled SmolLM2-135M-Instruct coprocessor: 432 latents of 54 prefixes
# (32-400 tokens of this repository's docs) had norms 3.45-3.88 (mean 3.66); the pause
# baseline's are 3.26-3.65, and the decoder's own embedding rows are at most 7.49. 16 is
# about 4x the largest latent. A checkpoint for another decoder should record its own.
DEFAULT_LATENT_NORM_MAX = 16.0


# Where the decoder sees a payload's n_latents vectors (`coprocessor.placement` in the
# manifest; absent in checkpoints older than the option, which insert):
# "insert" after the context, at positions P..P+n-1; "replace_tail" in place of the
# embeddings of the context's own last n tokens (the vectors hold those embeddings plus the
# latents, so the prompt's positions are the plain prompt's).
PLACEMENTS = ("insert", "replace_tail")


def replaced_tokens(placement: str, n_vectors: int) -> int:
    """Context tokens whose embeddings the vectors stand in for."""
    return n_vectors if placement == "replace_tail" else 0


def added_positions(placement: str, n_vectors: int) -> int:
    """Positions a hit adds to the plain prompt."""
    return n_vectors - replaced_tokens(placement, n_vectors)


def shortest_context(placement: str, n_vectors: int) -> int:
    """Fewest context tokens the vectors can be computed for and placed on: one, and more
    than the tail they replace (the coprocessor reads the tokens before it)."""
    return replaced_tokens(placement, n_vectors) + 1


class CheckpointMismatch(Exception):
    """A coprocessor checkpoint trained for another decoder; using it would produce garbage."""


def read_manifest(path: Path) -> dict[str, Any]:
    """A checkpoint's deliberate.json, refusing a missing file or another format version."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"{path} is not a coprocessor checkpoint (no {MANIFEST}); "
            "train one with `deliberate train` or omit --coprocessor for the bundled one"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{manifest_path}: checkpoint format {manifest.get('format_version')!r}, this "
            f"version of Deliberate reads format {FORMAT_VERSION}"
        )
    return manifest


def read_evaluation(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(evaluation, quality gate) recorded for a checkpoint; the gate fails if none was."""
    eval_path = Path(path) / EVALUATION
    if not eval_path.is_file():
        return {}, dict(NOT_EVALUATED)
    recorded = json.loads(eval_path.read_text())
    return recorded.get("evaluation", {}), {**NOT_EVALUATED, **recorded.get("quality_gate", {})}


def write_evaluation(path: Path, evaluation: dict[str, Any], gate: dict[str, Any]) -> None:
    text = json.dumps({"evaluation": evaluation, "quality_gate": gate}, indent=2) + "\n"
    (Path(path) / EVALUATION).write_text(text)


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    fingerprint: str
    decoder_fingerprint: str
    method: str
    n_latents: int
    hidden_size: int
    gate_passed: bool
    """The raw latents passed the recorded quality gate."""
    gate_passed_with_value_check: bool
    """The latents as served with the value check passed it."""
    gate_rule: str
    manifest: dict[str, Any]
    latent_norm_max: float = DEFAULT_LATENT_NORM_MAX
    """Largest L2 norm a served latent may have; payloads with a longer one are rejected."""
    placement: str = "insert"
    """Where the vectors go: after the context, or in place of its last n_latents tokens."""

    @property
    def added_positions(self) -> int:
        return added_positions(self.placement, self.n_latents)

    @property
    def replaced_tokens(self) -> int:
        return replaced_tokens(self.placement, self.n_latents)

    @property
    def shortest_context(self) -> int:
        return shortest_context(self.placement, self.n_latents)

    @classmethod
    def read(cls, path: Path) -> CheckpointInfo:
        manifest = read_manifest(path)
        _, gate = read_evaluation(path)
        norm_max = float(manifest.get("latent_norm_max", DEFAULT_LATENT_NORM_MAX))
        if not norm_max > 0:
            raise ValueError(f"{path / MANIFEST}: latent_norm_max must be positive, got {norm_max}")
        placement = str(manifest.get("coprocessor", {}).get("placement", "insert"))
        if placement not in PLACEMENTS:
            raise ValueError(f"{path / MANIFEST}: placement {placement!r}, expected {PLACEMENTS}")
        return cls(
            path=path,
            fingerprint=checkpoint_fingerprint(path),
            decoder_fingerprint=manifest["decoder_fingerprint"],
            method=manifest.get("method", "lora"),
            n_latents=int(manifest["n_latents"]),
            hidden_size=int(manifest["hidden_size"]),
            gate_passed=bool(gate["passed"]),
            gate_passed_with_value_check=bool(gate["passed_with_value_check"]),
            gate_rule=str(gate["rule"]),
            manifest=manifest,
            latent_norm_max=norm_max,
            placement=placement,
        )

    def gate(self, value_check: bool) -> bool:
        """Whether the recorded gate passed for the configuration in use."""
        return self.gate_passed_with_value_check if value_check else self.gate_passed

    def require_decoder(self, decoder_fingerprint: str) -> None:
        if decoder_fingerprint != self.decoder_fingerprint:
            raise CheckpointMismatch(
                f"coprocessor checkpoint {self.path} was trained for decoder "
                f"{self.decoder_fingerprint}, but the decoder in use is {decoder_fingerprint}. "
                "Use the decoder it was trained for, or train a coprocessor for this one "
                "(`deliberate train --model ...`)."
            )
