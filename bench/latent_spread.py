"""How much of a coprocessor's latents depends on the context it read.

    PYTHONPATH=. python bench/latent_spread.py CHECKPOINT [CHECKPOINT ...] [--contexts 64]

A residual coprocessor's latent i for context c is `base_i + proj(state_i(c)) / H`: a learned
constant plus a context-dependent part. A pause-token checkpoint is the constant alone. If the
context-dependent part is small against the constant, the coprocessor has learned offsets
that any context gets, which is what pause tokens learn too. Per checkpoint, over the
held-out prose documents (their first 256 tokens, the bundled sources' held-out split), with
norms averaged over the N_L latents:
- `base_norm`: |base_i|;
- `context_part_norm`: mean over contexts of |latent_i(c) - base_i|;
- `spread_norm`: mean over contexts of |latent_i(c) - mean_c latent_i(c)|, the part that
  differs between contexts;
- `token_embedding_norm`: the decoder's mean token-embedding norm, for scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+")
    parser.add_argument("--contexts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from coprocessor_worker.checkpoint_io import load_model
    from coprocessor_worker.data import bundled_documents
    from coprocessor_worker.model import torch_dtype
    from deliberate.models import prepare_bundled_decoder
    from deliberate.settings import Settings

    torch.set_num_threads(args.threads)
    decoder_dir = prepare_bundled_decoder(Settings().cache_dir)
    docs = bundled_documents("held_out")[: args.contexts]
    results = {}
    for checkpoint in args.checkpoints:
        model, _, tokenizer = load_model(checkpoint, decoder_dir, compute_dtype=torch_dtype("auto"))
        latents = []
        with torch.no_grad():
            for doc in docs:
                ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"][: args.tokens]
                ids_t = torch.tensor([ids])
                kv = None if model.config.method == "pause" else model.prefix_pass(ids_t)[0]
                latents.append(model.latents_at(kv, torch.tensor([[len(ids)]]))[0, 0])
        lat = torch.stack(latents).float()  # [contexts, N_L, H]
        base = model.base.detach().float()
        embeddings = model.embed(torch.arange(tokenizer.vocab_size)).float()
        results[str(checkpoint)] = {
            "method": model.config.method,
            "contexts": len(docs),
            "base_norm": float(base.norm(dim=-1).mean()),
            "context_part_norm": float((lat - base).norm(dim=-1).mean()),
            "spread_norm": float((lat - lat.mean(0)).norm(dim=-1).mean()),
            "token_embedding_norm": float(embeddings.norm(dim=-1).mean()),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
