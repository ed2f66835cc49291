"""Fingerprints of a decoder and of a coprocessor checkpoint (DESIGN §3).

A fingerprint is a content hash: two folders with the same config and weights share it,
whatever their path. Prefix keys include both fingerprints, so latents made for one
decoder or coprocessor are never served to another.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

_CHUNK = 1 << 20
# Files that decide what a decoder computes. Tokenizer files matter too: token ids are hashed
# into keys, so a different tokenizer must give a different fingerprint.
_DECODER_PATTERNS = ("config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json")


def _hash_files(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def decoder_fingerprint(model_dir: str | Path) -> str:
    """Hash of a Hugging Face model folder's config, weight and tokenizer files."""
    root = Path(model_dir)
    files = sorted({p for pattern in _DECODER_PATTERNS for p in root.glob(pattern)})
    if not any(p.suffix == ".safetensors" for p in files):
        raise FileNotFoundError(
            f"{root} holds no *.safetensors weights: is it a Hugging Face model folder? "
            "(`deliberate model prepare` makes the bundled one)"
        )
    return _hash_files(root, files)


# A checkpoint's recorded evaluation (cache_store.checkpoint.EVALUATION) says how good its
# latents are; it does not change them, so recording one must not change any prefix key.
_NOT_HASHED = frozenset({"evaluation.json"})


def checkpoint_fingerprint(checkpoint_dir: str | Path) -> str:
    """Hash of every file in a coprocessor checkpoint folder but its recorded evaluation."""
    root = Path(checkpoint_dir)
    files = [p for p in root.rglob("*") if p.is_file() and p.name not in _NOT_HASHED]
    if not files:
        raise FileNotFoundError(f"coprocessor checkpoint {root} is empty or missing")
    return _hash_files(root, files)
