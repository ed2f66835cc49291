"""The decoder's input embedding table, read straight from its safetensors files.

The server turns token ids into embeddings itself only to splice latents between the context
and the rest; it never runs the model (vLLM does).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

_EMBEDDING_SUFFIX = "embed_tokens.weight"


def _embedding_tensor_location(model_dir: Path) -> tuple[Path, str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        names = [n for n in weight_map if n.endswith(_EMBEDDING_SUFFIX)]
        if names:
            return model_dir / weight_map[names[0]], names[0]
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names = [n for n in f.keys() if n.endswith(_EMBEDDING_SUFFIX)]  # noqa: SIM118
        if names:
            return file, names[0]
    raise FileNotFoundError(f"no '*{_EMBEDDING_SUFFIX}' tensor in {model_dir}")


class EmbeddingTable:
    """Token ids to input embeddings, exactly as the decoder's embedding layer computes them."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    @classmethod
    def load(cls, model_dir: Path, dtype: torch.dtype) -> EmbeddingTable:
        file, name = _embedding_tensor_location(model_dir)
        with safe_open(file, framework="pt") as f:
            return cls(f.get_tensor(name).to(dtype))

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def embed(self, token_ids: list[int]) -> torch.Tensor:
        return self.weight[torch.tensor(token_ids, dtype=torch.long)]
