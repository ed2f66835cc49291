"""The committed default checkpoint on the real bundled decoder (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cache_store.checkpoint import CheckpointMismatch, read_evaluation
from coprocessor_worker.checkpoints import bundled_checkpoint_dir
from coprocessor_worker.coprocessor import Coprocessor


@pytest.fixture(scope="module")
def coprocessor(bundled_decoder: Path) -> Coprocessor:
    return Coprocessor.load(
        bundled_checkpoint_dir("lora"), bundled_decoder, compute_dtype=torch.float32
    )


def test_bundled_checkpoint_metadata(bundled_decoder: Path) -> None:
    from cache_store.fingerprint import decoder_fingerprint

    for method in ("lora", "pause"):
        meta = json.loads((bundled_checkpoint_dir(method) / "deliberate.json").read_text())
        assert meta["method"] == method
        assert meta["decoder_fingerprint"] == decoder_fingerprint(bundled_decoder)
        assert (meta["n_latents"], meta["hidden_size"]) == (8, 576)
        _, gate = read_evaluation(bundled_checkpoint_dir(method))
        assert isinstance(gate["passed"], bool) and gate["rule"]
        assert isinstance(gate["passed_with_value_check"], bool)


def test_real_latents_batched_equal_single(coprocessor: Coprocessor) -> None:
    tok = coprocessor.tokenizer
    texts = [
        "The committee met on Tuesday to discuss the budget for the new library.",
        "She opened the door and looked out at the rain.",  # longer than the 8 replaced
        "In 1905 Einstein published four papers that changed physics, among them special "
        "relativity and the photoelectric effect, which later won him the Nobel Prize.",
    ]
    prefixes = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    batched = coprocessor.latents(prefixes)
    for prefix, lat in zip(prefixes, batched, strict=True):
        assert lat.shape == (8, 576) and lat.dtype == torch.bfloat16
        assert torch.isfinite(lat.float()).all()
        single = coprocessor.latents([prefix])[0]
        # fp32 compute; padding changes matmul shapes only, so within bf16 rounding.
        torch.testing.assert_close(lat.float(), single.float(), atol=2e-2, rtol=1e-2)
    # Latents live at input-embedding scale (rows ~3 in norm), not final-state scale (~50).
    norms = torch.stack(batched).float().norm(dim=-1)
    embed_norm = coprocessor.model.embed(torch.arange(1000)).float().norm(dim=-1).mean()
    assert (norms < 4 * embed_norm).all()


def test_a_prefix_no_longer_than_the_replaced_tail_is_refused(coprocessor: Coprocessor) -> None:
    assert coprocessor.model.config.placement == "replace_tail"
    with pytest.raises(ValueError, match="need 9 tokens"):
        coprocessor.latents([list(range(100, 108))])


def test_real_checkpoint_refused_for_another_decoder(tiny_llama: Path) -> None:
    with pytest.raises(CheckpointMismatch):
        Coprocessor.load(bundled_checkpoint_dir("lora"), tiny_llama)
