"""Exact math of the packed coprocessor on a tiny random Llama (fp32), and the checkpoint
contract. The real-decoder tests are in test_coprocessor_real.py."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cache_store.checkpoint import CheckpointMismatch
from coprocessor_worker.checkpoint_io import save_checkpoint
from coprocessor_worker.coprocessor import Coprocessor
from coprocessor_worker.model import (
    CoprocessorConfig,
    CoprocessorModel,
    build_model,
    group_mask,
    load_decoder,
)

N_AHEAD = 5


def _model(tiny_llama: Path, **overrides: object) -> CoprocessorModel:
    torch.manual_seed(1)
    decoder, tokenizer = load_decoder(tiny_llama, torch.float32)
    config = CoprocessorConfig(n_latents=3, lora_rank=4, **overrides)  # type: ignore[arg-type]
    model = build_model(decoder, tokenizer, config, torch.float32)
    # Move every trainable tensor off its initial value: zero-initialised LoRA B and projection
    # would make gradients trivially equal (zero) and hide a wrong mask.
    with torch.no_grad():
        for group in model.trainable_parameters().values():
            for p in group:
                p.add_(torch.randn_like(p) * 0.05)
        if config.method != "pause":
            model.proj.weight.add_(torch.randn_like(model.proj.weight) * 5.0)
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49152, (2, 24), generator=g)
    # Overlapping groups (p_{k+1} - p_k < N_AHEAD): group k's ahead tokens are in group
    # k+1's cache, the case where a wrong mask would leak.
    # Every prefix longer than N_L = 3, so replace_tail has a tail to replace.
    prefix_lens = torch.tensor([[4, 6, 12, 18], [5, 8, 11, 19]])
    return ids, prefix_lens


def _grads(model: CoprocessorModel, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = [p for g in model.trainable_parameters().values() for p in g]
    grads = torch.autograd.grad(loss, params)
    return {str(i): g for i, g in enumerate(grads)}


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"method": "pause"},
        {"hidden_source": "pre_norm"},
        {"output": "direct"},
        {"method": "full"},
        {"replay_last_token": True},
        {"method": "pause", "replay_last_token": True},
        {"placement": "replace_tail"},
        {"method": "pause", "placement": "replace_tail"},
    ],
    ids=[
        "lora",
        "pause",
        "pre_norm",
        "direct",
        "full",
        "replay",
        "pause_replay",
        "tail",
        "pause_tail",
    ],
)
def test_packed_loss_and_gradients_equal_naive_loop(tiny_llama: Path, overrides: dict) -> None:
    model = _model(tiny_llama, **overrides)
    ids, prefix_lens = _batch()
    packed, base = model.packed_nll(ids, prefix_lens, N_AHEAD)
    naive = model.naive_nll(ids, prefix_lens, N_AHEAD)
    torch.testing.assert_close(packed, naive, atol=2e-5, rtol=1e-5)
    # Latents matter: the augmented loss differs from the plain decoder's.
    assert (packed - base).abs().max() > 1e-3
    g_packed = _grads(model, packed.mean())
    g_naive = _grads(model, naive.mean())
    assert any(g.abs().max() > 1e-6 for g in g_packed.values())
    for name in g_packed:
        torch.testing.assert_close(g_packed[name], g_naive[name], atol=1e-6, rtol=1e-4)


def test_do_no_harm_term_is_the_kl_from_the_plain_next_token_distribution(
    tiny_llama: Path,
) -> None:
    """KL(plain || augmented) at each ahead position, computed from the decoder's own logits
    over context ++ latents ++ ahead tokens; its NLL is packed_nll's, and it trains the
    coprocessor (non-zero gradients)."""
    model = _model(tiny_llama)
    ids, prefix_lens = _batch()
    nll, base, kl = model.packed_nll_and_kl(ids, prefix_lens, N_AHEAD)
    packed, packed_base = model.packed_nll(ids, prefix_lens, N_AHEAD)
    torch.testing.assert_close(nll, packed)
    torch.testing.assert_close(base, packed_base)
    b, k = 0, 2
    p = int(prefix_lens[b, k])
    with torch.no_grad():
        latents = model.latents_at(model.prefix_pass(ids)[0], prefix_lens)[b, k]
    with torch.no_grad(), model.decoder_role():
        ahead = ids[b, p : p + N_AHEAD]
        embeds = torch.cat([model.embed(ids[b, :p]), latents, model.embed(ahead[:-1])])
        augmented = model.decoder(inputs_embeds=embeds[None]).logits[0, p + latents.shape[0] - 1 :]
        plain = model.decoder(input_ids=ids[b : b + 1, : p + N_AHEAD]).logits[0, p - 1 : -1]
    expected = (plain.softmax(-1) * (plain.log_softmax(-1) - augmented.log_softmax(-1))).sum(-1)
    torch.testing.assert_close(kl[b, k].detach(), expected, atol=1e-5, rtol=1e-4)
    assert kl.min() >= 0 and kl.max() > 1e-3
    assert any(g.abs().max() > 1e-6 for g in _grads(model, kl.mean()).values())


@pytest.mark.parametrize("placement", ["insert", "replace_tail"])
def test_no_leakage_between_groups_or_from_the_future(tiny_llama: Path, placement: str) -> None:
    model = _model(tiny_llama, placement=placement)
    ids, prefix_lens = _batch()
    with torch.no_grad():
        before, _ = model.packed_nll(ids, prefix_lens, N_AHEAD)
    for q in (4, 9, 13, 20):
        changed = ids.clone()
        changed[:, q] = (changed[:, q] + 12345) % 49152
        with torch.no_grad():
            after, _ = model.packed_nll(changed, prefix_lens, N_AHEAD)
        for b in range(ids.shape[0]):
            for k, p in enumerate(prefix_lens[b].tolist()):
                if q >= p + N_AHEAD:  # after group k's window: nothing of group k may change
                    torch.testing.assert_close(after[b, k], before[b, k], atol=0, rtol=0)
                elif q >= p:  # inside its window: predictions before token q stay exact
                    j = q - p
                    torch.testing.assert_close(after[b, k, :j], before[b, k, :j], atol=0, rtol=0)
                    assert (after[b, k, j:] - before[b, k, j:]).abs().max() > 0
                else:  # in its prefix: it must see it (the test is sensitive)
                    assert (after[b, k] - before[b, k]).abs().max() > 0


@pytest.mark.parametrize("replay", [False, True], ids=["latents", "replay"])
def test_latents_sit_where_prompt_embeds_puts_them(tiny_llama: Path, replay: bool) -> None:
    """A plain forward over embed(prefix) ++ inserted vectors ++ embed(rest), numbered 0.. as
    vLLM numbers prompt_embeds, predicts the rest exactly as the packed training pass does."""
    model = _model(tiny_llama, replay_last_token=replay)
    ids, prefix_lens = _batch()
    with torch.no_grad():
        packed, _ = model.packed_nll(ids, prefix_lens, N_AHEAD)
        kv, _ = model.prefix_pass(ids)
        latents = model.inserted_at(kv, ids, prefix_lens)
        b, k = 1, 2
        p = int(prefix_lens[b, k])
        assert latents.shape[2] == 3 + replay
        if replay:  # the prefix's last token, once more, after the latents
            torch.testing.assert_close(latents[b, k, -1], model.embed(ids[b, p - 1]))
        rest = ids[b, p : p + N_AHEAD]
        embeds = torch.cat([model.embed(ids[b, :p]), latents[b, k], model.embed(rest[:-1])])
        with model.decoder_role():
            logits = model.decoder(inputs_embeds=embeds[None]).logits[0]
        n = latents.shape[2]
        nll = torch.nn.functional.cross_entropy(logits[p + n - 1 :], rest, reduction="none")
    torch.testing.assert_close(nll, packed[b, k], atol=2e-5, rtol=1e-5)


def test_replacing_the_tail_sits_where_prompt_embeds_puts_it(tiny_llama: Path) -> None:
    """replace_tail: a plain forward over embed(prefix[:-N_L]) ++ vectors ++ embed(rest),
    numbered 0.. as vLLM numbers prompt_embeds, predicts the rest as the packed pass does;
    the vectors are the tail's embeddings plus the latents."""
    model = _model(tiny_llama, placement="replace_tail")
    ids, prefix_lens = _batch()
    b, k, n = 1, 2, 3
    p = int(prefix_lens[b, k])
    with torch.no_grad():
        packed, _ = model.packed_nll(ids, prefix_lens, N_AHEAD)
        kv, _ = model.prefix_pass(ids)
        vectors = model.inserted_at(kv, ids, prefix_lens)[b, k]
        latents = model.latents_at(kv, prefix_lens)[b, k]
        torch.testing.assert_close(vectors, model.embed(ids[b, p - n : p]) + latents)
        rest = ids[b, p : p + N_AHEAD]
        embeds = torch.cat([model.embed(ids[b, : p - n]), vectors, model.embed(rest[:-1])])
        with model.decoder_role():
            logits = model.decoder(inputs_embeds=embeds[None]).logits[0]
        nll = torch.nn.functional.cross_entropy(logits[p - 1 :], rest, reduction="none")
    torch.testing.assert_close(nll, packed[b, k], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "pause"])
def test_an_untrained_tail_replacement_is_the_plain_decoder(tiny_llama: Path, method: str) -> None:
    """Step 0 of replace_tail does no harm by construction: zero latents, the plain NLL;
    and it still trains (the gradient reaches the latents' parameters)."""
    torch.manual_seed(1)
    decoder, tokenizer = load_decoder(tiny_llama, torch.float32)
    config = CoprocessorConfig(n_latents=3, lora_rank=4, method=method, placement="replace_tail")
    model = build_model(decoder, tokenizer, config, torch.float32)
    ids, prefix_lens = _batch()
    augmented, plain = model.packed_nll(ids, prefix_lens, N_AHEAD)
    torch.testing.assert_close(augmented, plain, atol=2e-5, rtol=1e-5)
    assert any(g.abs().max() > 1e-6 for g in _grads(model, augmented.mean()).values())


def test_replace_tail_refuses_a_replayed_token() -> None:
    with pytest.raises(ValueError, match="replay_last_token"):
        CoprocessorConfig(placement="replace_tail", replay_last_token=True)


def test_group_mask_blocks() -> None:
    mask = group_mask(torch.tensor([[2, 4]]), cache_len=5, group_len=2)[0, 0]
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0, 1, 0, 0, 0],
            [1, 1, 0, 0, 0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 1, 0],
            [1, 1, 1, 1, 0, 0, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


def _save(model: CoprocessorModel, out: Path, fingerprint: str) -> Path:
    return save_checkpoint(
        model,
        out,
        decoder_fingerprint=fingerprint,
        training={"steps": 0},
    )


def test_checkpoint_round_trip_and_batched_equals_single(tiny_llama: Path, tmp_path: Path) -> None:
    from cache_store.fingerprint import decoder_fingerprint

    model = _model(tiny_llama)
    ckpt = _save(model, tmp_path / "ckpt", decoder_fingerprint(tiny_llama))
    assert {"deliberate.json", "latents.safetensors", "adapter_model.safetensors"} <= {
        p.name for p in ckpt.iterdir()
    }
    loaded = Coprocessor.load(ckpt, tiny_llama, dtype=torch.float32, compute_dtype=torch.float32)
    assert (loaded.n_latents, loaded.hidden_size) == (3, 64)
    assert loaded.decoder_fingerprint == decoder_fingerprint(tiny_llama)
    assert len(loaded.fingerprint) == 32

    prefixes = [[5, 6, 7, 8, 9, 10, 11], [40, 41], [100, 200, 300, 400]]
    batched = loaded.latents(prefixes)
    singles = [loaded.latents([p])[0] for p in prefixes]
    for a, b in zip(batched, singles, strict=True):
        assert a.shape == (3, 64) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # Different prefixes give different latents: the coprocessor reads the context.
    assert (batched[0] - batched[1]).abs().max() > 1e-4
    # The loaded weights are the saved ones: same latents as the in-memory model.
    with torch.no_grad():
        kv, _ = model.prefix_pass(torch.tensor([prefixes[0]]))
        direct = model.latents_at(kv, torch.tensor([[7]]))[0, 0]
    torch.testing.assert_close(batched[0], direct, atol=1e-5, rtol=1e-5)


def test_a_replaying_checkpoint_serves_its_latents_and_the_last_token(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """The manifest's n_latents (what the server inserts and the payload must hold) counts the
    replayed token; the worker's vectors end with the prefix's last token's embedding."""
    from cache_store.checkpoint import CheckpointInfo
    from cache_store.fingerprint import decoder_fingerprint

    model = _model(tiny_llama, replay_last_token=True)
    ckpt = _save(model, tmp_path / "ckpt", decoder_fingerprint(tiny_llama))
    assert CheckpointInfo.read(ckpt).n_latents == 4
    loaded = Coprocessor.load(ckpt, tiny_llama, dtype=torch.float32, compute_dtype=torch.float32)
    assert loaded.n_latents == 4
    prefix = [5, 6, 7, 8, 9, 10, 11]
    vectors = loaded.latents([prefix])[0]
    with torch.no_grad():
        kv, _ = model.prefix_pass(torch.tensor([prefix]))
        latents = model.latents_at(kv, torch.tensor([[len(prefix)]]))[0, 0]
        last = model.embed(torch.tensor(prefix[-1]))
    torch.testing.assert_close(vectors, torch.cat([latents, last[None]]), atol=1e-5, rtol=1e-5)


def test_checkpoint_for_another_decoder_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    model = _model(tiny_llama)
    ckpt = _save(model, tmp_path / "other", "0" * 32)
    with pytest.raises(CheckpointMismatch, match="trained for decoder 0000"):
        Coprocessor.load(ckpt, tiny_llama, dtype=torch.float32, compute_dtype=torch.float32)


def test_pause_checkpoint_latents_ignore_the_prefix(tiny_llama: Path, tmp_path: Path) -> None:
    from cache_store.fingerprint import decoder_fingerprint

    model = _model(tiny_llama, method="pause")
    ckpt = _save(model, tmp_path / "pause", decoder_fingerprint(tiny_llama))
    loaded = Coprocessor.load(ckpt, tiny_llama, dtype=torch.float32, compute_dtype=torch.float32)
    a, b = loaded.latents([[1, 2, 3], [9]])
    assert torch.equal(a, b) and torch.equal(a, model.base.detach())


def test_value_check_matches_separate_passes(tiny_llama: Path, tmp_path: Path) -> None:
    """latents_with_value packs the serving latents and every check point of a batch of
    contexts of different lengths into one pass each; it must equal computing them apart:
    the serving latents as `latents` does, and each check point's NLL change as `packed_nll`
    of that context alone."""
    from cache_store.fingerprint import decoder_fingerprint
    from coprocessor_worker.coprocessor import ValueCheck

    model = _model(tiny_llama)
    with torch.no_grad():  # a coprocessor whose latents depend on the context
        model.proj.weight.normal_(0, 5.0)
    ckpt = _save(model, tmp_path / "ckpt", decoder_fingerprint(tiny_llama))
    loaded = Coprocessor.load(ckpt, tiny_llama, dtype=torch.float32, compute_dtype=torch.float32)
    check = ValueCheck(points=2, tokens=6, skip=2, min_prefix=4, sample=1.0)
    generator = torch.Generator().manual_seed(1)
    prefixes = [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (23, 9, 5)]
    results = loaded.latents_with_value(prefixes, check)
    assert [len(check.points_for(p)) for p in prefixes] == [2, 0, 0]
    assert results[1][1] is None and results[2][1] is None  # too short for a check point
    for (latents, _), single in zip(results, loaded.latents(prefixes), strict=True):
        torch.testing.assert_close(latents, single, atol=1e-5, rtol=1e-5)
    ids = torch.tensor([prefixes[0]])
    with torch.no_grad():
        nll, plain = loaded.model.packed_nll(ids, torch.tensor([[17, 11]]), 6)
    expected = (nll - plain)[0, :, 2:].reshape(-1)
    figure = results[0][1]
    assert figure is not None and figure.tokens == 8
    assert figure.delta == pytest.approx(float(expected.mean()), abs=1e-5)
    assert figure.std_error == pytest.approx(float(expected.std() / 8**0.5), abs=1e-5)


def test_value_check_with_a_prompt_between_matches_spliced_forwards(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """With `prompt`, the check scores the tail after the prompt in both runs: with latents,
    head ++ latents ++ prompt ++ tail; without, head ++ prompt ++ tail. Each must equal a plain
    forward of the decoder over that spliced sequence (HF's own causal masking)."""
    from cache_store.fingerprint import decoder_fingerprint
    from coprocessor_worker.coprocessor import ValueCheck

    model = _model(tiny_llama)
    with torch.no_grad():
        model.proj.weight.normal_(0, 5.0)
    ckpt = _save(model, tmp_path / "ckpt", decoder_fingerprint(tiny_llama))
    loaded = Coprocessor.load(ckpt, tiny_llama, dtype=torch.float32, compute_dtype=torch.float32)
    check = ValueCheck(
        points=1, tokens=6, skip=0, min_prefix=4, prompt="\nQuestion: why?", sample=1.0
    )
    prompt = check.prompt_ids(loaded.tokenizer)
    assert prompt is not None and prompt.numel() >= 2
    context = torch.randint(3, 49152, (23,), generator=torch.Generator().manual_seed(2)).tolist()
    ((_, figure),) = loaded.latents_with_value([context], check)
    head, tail = torch.tensor(context[:17]), torch.tensor(context[17:])
    latents = loaded.latents([context[:17]])[0]
    decoder = loaded.model.decoder
    with torch.no_grad(), loaded.model.decoder_role():

        def tail_nll(*parts: torch.Tensor) -> torch.Tensor:
            embeds = torch.cat(parts)[None]
            logits = decoder(inputs_embeds=embeds).logits[0, -len(tail) - 1 : -1]
            return torch.nn.functional.cross_entropy(logits.float(), tail, reduction="none")

        embed = loaded.model.embed
        with_latents = tail_nll(embed(head), latents, embed(prompt), embed(tail))
        without = tail_nll(embed(head), embed(prompt), embed(tail))
    expected = with_latents - without
    assert figure is not None and figure.tokens == 6
    assert figure.delta == pytest.approx(float(expected.mean()), abs=1e-4)
    # The prompt changes what is measured: without it the same context gives another figure.
    ((_, plain_figure),) = loaded.latents_with_value([context], replace(check, prompt=""))
    assert plain_figure is not None and abs(plain_figure.delta - figure.delta) > 1e-4


def test_value_check_sample_is_a_stable_share_of_contexts(tmp_path: Path) -> None:
    """The checked sample is picked by a hash of the tokens: the same context always gets the
    same answer, about `sample` of random contexts are in it, all of them at sample 1."""
    from cache_store.checkpoint import write_evaluation
    from coprocessor_worker.coprocessor import ValueCheck

    generator = torch.Generator().manual_seed(3)
    contexts = [torch.randint(3, 49152, (64,), generator=generator).tolist() for _ in range(400)]
    half = ValueCheck(sample=0.5)
    picked = [half.checks(c) for c in contexts]
    assert picked == [half.checks(list(c)) for c in contexts]
    assert 0.4 < sum(picked) / len(picked) < 0.6
    assert [bool(half.points_for(c)) for c in contexts] == picked
    assert all(ValueCheck(sample=1.0).checks(c) for c in contexts)
    with pytest.raises(ValueError, match="sample"):
        ValueCheck(sample=0.0)
    # An evaluation recorded before sampling existed checked every context: so does its
    # checkpoint; one with no recorded evaluation gets the default.
    write_evaluation(tmp_path, {"value_check": {"points": 2, "tokens": 16}}, {"passed": True})
    assert ValueCheck.recorded_for(tmp_path) == ValueCheck(points=2, sample=1.0)
    assert ValueCheck.recorded_for(tmp_path / "none").sample == ValueCheck.sample


def test_value_check_outside_its_sample_leaves_no_figure(tiny_llama: Path, tmp_path: Path) -> None:
    """Contexts outside the sample get their latents and no figure, in the same batch as
    checked ones, whose figures are those of a check of every context."""
    from cache_store.fingerprint import decoder_fingerprint
    from coprocessor_worker.coprocessor import ValueCheck

    model = _model(tiny_llama)
    ckpt = _save(model, tmp_path / "ckpt", decoder_fingerprint(tiny_llama))
    loaded = Coprocessor.load(ckpt, tiny_llama, dtype=torch.float32, compute_dtype=torch.float32)
    generator = torch.Generator().manual_seed(4)
    contexts = [torch.randint(3, 49152, (24,), generator=generator).tolist() for _ in range(8)]
    half = ValueCheck(tokens=6, skip=0, min_prefix=4, sample=0.5)
    picked = [half.checks(c) for c in contexts]
    assert any(picked) and not all(picked)  # this seed gives both kinds
    sampled = loaded.latents_with_value(contexts, half)
    every = loaded.latents_with_value(contexts, replace(half, sample=1.0))
    for chosen, (lat, figure), (lat_all, figure_all) in zip(picked, sampled, every, strict=True):
        torch.testing.assert_close(lat, lat_all)
        if chosen:
            assert figure is not None and figure_all is not None
            assert figure.delta == pytest.approx(figure_all.delta, abs=1e-5)
        else:
            assert figure is None and figure_all is not None
