"""The request-side decisions of `Augmenter.plan`, on the in-memory store and the bundled
checkpoint's real manifest, with its recorded quality gate set either way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from cache_store import open_store
from cache_store.checkpoint import CheckpointInfo
from cache_store.fingerprint import decoder_fingerprint
from coprocessor_worker.coprocessor import bundled_checkpoint_dir
from server.augmentation import AugmentationStatus, Augmenter
from server.embeddings import EmbeddingTable
from server.metrics import ServerMetrics


def _augmenter(
    bundled_decoder: Path, *, allow_unvalidated: bool, gate_passed: bool = False
) -> Augmenter:
    registry = CollectorRegistry()
    info = CheckpointInfo.read(bundled_checkpoint_dir())
    return Augmenter(
        store=open_store(None, registry=registry),
        embeddings=EmbeddingTable.load(bundled_decoder, torch.float32),
        decoder_fp=decoder_fingerprint(bundled_decoder),
        coprocessor=dataclasses.replace(info, gate_passed=gate_passed),
        default_tenant="t",
        min_context_tokens=8,
        lookup_timeout_s=1.0,
        max_wait_s=1.0,
        allow_unvalidated=allow_unvalidated,
        metrics=ServerMetrics(registry),
    )


async def test_a_failed_gate_skips_latents_unless_overridden_a_passed_one_applies(
    bundled_decoder: Path,
) -> None:
    context, rest = list(range(100, 140)), [5, 6, 7]

    gated = _augmenter(bundled_decoder, allow_unvalidated=False)
    plan = await gated.plan(context, rest, tenant=None, augment=True, wait_s=0)
    assert plan.status is AugmentationStatus.SKIPPED_UNVALIDATED
    assert plan.prompt == {"prompt_token_ids": context + rest}
    assert (await gated.store.queue_stats()).length == 0  # no worker time spent on it

    for overridden in (
        _augmenter(bundled_decoder, allow_unvalidated=True),
        _augmenter(bundled_decoder, allow_unvalidated=False, gate_passed=True),
    ):
        plan = await overridden.plan(context, rest, tenant=None, augment=True, wait_s=0)
        assert plan.status is AugmentationStatus.MISS_ENQUEUED
        assert (await overridden.store.queue_stats()).length == 1


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
