"""The request-side decisions of `Augmenter.plan`, on the in-memory store and the bundled
checkpoint's real manifest, with its recorded quality gate set either way, and the value
check's verdicts read from the store's shared estimates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from cache_store import encode_payload, open_store
from cache_store.checkpoint import CheckpointInfo
from cache_store.fingerprint import decoder_fingerprint
from cache_store.value import ValueFigure, ValuePolicy
from coprocessor_worker.checkpoints import bundled_checkpoint_dir
from server.augmentation import AugmentationStatus, Augmenter
from server.embeddings import EmbeddingTable
from server.metrics import ServerMetrics

CONTEXT, REST = list(range(100, 140)), [5, 6, 7]


def _augmenter(
    bundled_decoder: Path,
    *,
    allow_unvalidated: bool = False,
    gate_passed: bool = False,
    gate_passed_with_value_check: bool = False,
    policy: ValuePolicy | None = None,
    placement: str = "insert",
) -> Augmenter:
    registry = CollectorRegistry()
    info = CheckpointInfo.read(bundled_checkpoint_dir())
    return Augmenter(
        store=open_store(None, registry=registry),
        embeddings=EmbeddingTable.load(bundled_decoder, torch.float32),
        decoder_fp=decoder_fingerprint(bundled_decoder),
        coprocessor=dataclasses.replace(
            info,
            gate_passed=gate_passed,
            gate_passed_with_value_check=gate_passed_with_value_check,
            placement=placement,
        ),
        default_tenant="t",
        min_context_tokens=8,
        lookup_timeout_s=1.0,
        max_wait_s=1.0,
        allow_unvalidated=allow_unvalidated,
        value_policy=policy or ValuePolicy(min_contexts=5),
        value_refresh_s=1e-6,  # re-read the estimate on every request
        metrics=ServerMetrics(registry),
    )


async def _plan(augmenter: Augmenter, context: list[int] = CONTEXT):
    return await augmenter.plan(context, REST, tenant=None, augment=True, wait_s=0)


async def _publish(
    augmenter: Augmenter, context: list[int], figure: ValueFigure | None
) -> tuple[str, torch.Tensor]:
    """What a worker does: take the job the miss queued, publish latents with their figure."""
    assert (await _plan(augmenter, context)).status is AugmentationStatus.MISS_ENQUEUED
    [delivery] = await augmenter.store.claim_jobs("w", block_s=0.1)
    job = delivery.job
    # at embedding-row scale (norm about 2.4), inside the checkpoint's latent norm bound
    latents = 0.1 * torch.randn(augmenter.n_latents, augmenter.embeddings.hidden_size)
    await augmenter.store.publish(
        delivery,
        encode_payload(
            latents,
            key=job.key,
            decoder_fp=job.decoder_fp,
            coprocessor_fp=job.coprocessor_fp,
            prefix_len=job.prefix_len,
            value=figure,
        ),
    )
    return job.key, latents


async def test_the_gate_for_the_configuration_in_use_decides(bundled_decoder: Path) -> None:
    on, off = ValuePolicy(enabled=True), ValuePolicy(enabled=False)
    # Passed only as protected by the value check: applied with it on, skipped with it off.
    protected_only = {"gate_passed": False, "gate_passed_with_value_check": True}
    raw_only = {"gate_passed": True, "gate_passed_with_value_check": False}
    cases = [
        (protected_only, on, AugmentationStatus.MISS_ENQUEUED),
        (protected_only, off, AugmentationStatus.SKIPPED_UNVALIDATED),
        (raw_only, on, AugmentationStatus.SKIPPED_UNVALIDATED),
        (raw_only, off, AugmentationStatus.MISS_ENQUEUED),
    ]
    for gate, policy, expected in cases:
        augmenter = _augmenter(bundled_decoder, policy=policy, **gate)
        plan = await _plan(augmenter)
        assert plan.status is expected, (gate, policy)
        queued = (await augmenter.store.queue_stats()).length
        assert queued == (expected is AugmentationStatus.MISS_ENQUEUED)  # no worker time spent
    overridden = _augmenter(bundled_decoder, allow_unvalidated=True)
    assert (await _plan(overridden)).status is AugmentationStatus.MISS_ENQUEUED
    skipped = await _plan(_augmenter(bundled_decoder))
    assert skipped.prompt == {"prompt_token_ids": CONTEXT + REST}


async def test_latents_follow_the_shared_estimate(bundled_decoder: Path) -> None:
    augmenter = _augmenter(bundled_decoder, gate_passed_with_value_check=True)
    fp = augmenter.coprocessor.fingerprint
    key, _ = await _publish(augmenter, CONTEXT, ValueFigure(-0.05, 0.05, 26))
    # Published, but no evidence yet: answered plainly, saying why.
    plan = await _plan(augmenter)
    assert plan.status is AugmentationStatus.DECLINED and plan.key == key
    assert "not enough evidence" in (plan.reason or "")
    assert plan.prompt == {"prompt_token_ids": CONTEXT + REST}
    for delta in (-0.04, -0.05, -0.06, -0.05, -0.045):  # what the workers measured
        await augmenter.store.record_value(fp, "t", delta)
    plan = await _plan(augmenter)
    assert plan.status is AugmentationStatus.HIT and "prompt_embeds" in plan.prompt
    for _ in range(20):  # then the contexts start to show harm
        await augmenter.store.record_value(fp, "t", 0.2)
    plan = await _plan(augmenter)
    assert plan.status is AugmentationStatus.DECLINED and "upper bound" in (plan.reason or "")
    # Another tenant with its own evidence of help is still served.
    for _ in range(5):
        await augmenter.store.record_value(fp, "helped", -0.05)
    plan = await augmenter.plan(CONTEXT, REST, tenant="helped", augment=True, wait_s=0)
    assert plan.status is AugmentationStatus.MISS_ENQUEUED  # its own key: not computed yet


async def test_confidently_harmful_latents_are_never_served(bundled_decoder: Path) -> None:
    augmenter = _augmenter(bundled_decoder, gate_passed_with_value_check=True)
    for _ in range(10):
        await augmenter.store.record_value(augmenter.coprocessor.fingerprint, "t", -0.05)
    await _publish(augmenter, CONTEXT, ValueFigure(0.8, 0.05, 26))
    plan = await _plan(augmenter)
    assert plan.status is AugmentationStatus.DECLINED and "confidently harmful" in plan.reason


async def test_value_check_off_serves_published_latents(bundled_decoder: Path) -> None:
    augmenter = _augmenter(bundled_decoder, gate_passed=True, policy=ValuePolicy(enabled=False))
    await _publish(augmenter, CONTEXT, ValueFigure(0.8, 0.05, 26))
    assert (await _plan(augmenter)).status is AugmentationStatus.HIT


async def test_short_disabled_and_absent_contexts_stay_plain(bundled_decoder: Path) -> None:
    augmenter = _augmenter(bundled_decoder, allow_unvalidated=True)
    cases = {
        AugmentationStatus.NO_CONTEXT: ([], True),
        AugmentationStatus.TOO_SHORT: ([1, 2, 3], True),
        AugmentationStatus.DISABLED: (list(range(100, 140)), False),
    }
    for expected, (context, augment) in cases.items():
        plan = await augmenter.plan(context, [9], tenant=None, augment=augment, wait_s=0)
        assert plan.status is expected
        assert plan.prompt == {"prompt_token_ids": [*context, 9]}
    assert (await augmenter.store.queue_stats()).length == 0


async def test_a_hit_places_the_latents_where_the_checkpoint_says(bundled_decoder: Path) -> None:
    """insert: context ++ latents ++ rest, N_L more positions; replace_tail: the latents stand
    in for the context's last N_L tokens, so the prompt keeps the plain prompt's positions."""
    for placement in ("insert", "replace_tail"):
        augmenter = _augmenter(
            bundled_decoder,
            gate_passed=True,
            policy=ValuePolicy(enabled=False),
            placement=placement,
        )
        _, latents = await _publish(augmenter, CONTEXT, None)
        plan = await _plan(augmenter)
        assert plan.status is AugmentationStatus.HIT
        n = augmenter.n_latents
        kept = CONTEXT if placement == "insert" else CONTEXT[:-n]
        embed = augmenter.embeddings.embed
        expected = torch.cat([embed(kept), latents.to(torch.bfloat16).float(), embed(REST)])
        torch.testing.assert_close(plan.prompt["prompt_embeds"], expected)
        assert plan.added_positions == (n if placement == "insert" else 0)
        assert plan.prompt_tokens == len(CONTEXT) + len(REST)


async def test_a_context_no_longer_than_the_replaced_tail_is_too_short(
    bundled_decoder: Path,
) -> None:
    augmenter = _augmenter(bundled_decoder, allow_unvalidated=True, placement="replace_tail")
    n = augmenter.n_latents  # the minimum of 8 context tokens is not enough at N_L = 8
    short = await augmenter.plan(CONTEXT[:n], REST, tenant=None, augment=True, wait_s=0)
    assert short.status is AugmentationStatus.TOO_SHORT
    longer = await augmenter.plan(CONTEXT[: n + 1], REST, tenant=None, augment=True, wait_s=0)
    assert longer.status is AugmentationStatus.MISS_ENQUEUED
