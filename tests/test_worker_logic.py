"""The worker's pure decisions: which jobs are poison, how jobs are batched, which batch a
claim computes, how a failing batch is split."""

from __future__ import annotations

import dataclasses

from cache_store import Delivery, Job
from coprocessor_worker.worker import (
    WorkerLimits,
    failure_reason,
    plan_batches,
    poison_reason,
    split_batch,
    take_batch,
)


class _Model:
    fingerprint = "c" * 32
    decoder_fingerprint = "d" * 32
    n_latents = 4

    def latents(self, prefixes):
        raise AssertionError


LIMITS = WorkerLimits(max_jobs=3, max_tokens=100, max_prefix_tokens=64, vocab_size=1000)


def _delivery(
    token_ids: list[int], decoder_fp: str = "d" * 32, enqueued_at: float = 1000.0
) -> Delivery:
    job = Job.create(
        tenant="t", decoder_fp=decoder_fp, coprocessor_fp="c" * 32, token_ids=token_ids
    )
    job = dataclasses.replace(job, enqueued_at=enqueued_at)
    return Delivery(job=job, stream_id=f"{int(enqueued_at)}-{len(token_ids)}", deliveries=1,
                    consumer="w")  # fmt: skip


def test_poison_jobs_are_named() -> None:
    model = _Model()
    assert poison_reason(_delivery([1, 2, 3]), model, LIMITS) is None
    assert "decoder" in poison_reason(_delivery([1], decoder_fp="e" * 32), model, LIMITS)
    assert "exceeds" in poison_reason(_delivery(list(range(65))), model, LIMITS)
    assert "vocabulary" in poison_reason(_delivery([5, 1000]), model, LIMITS)
    # Latents that replace a context's last 8 tokens need a longer context.
    tail = dataclasses.replace(LIMITS, min_prefix_tokens=9)
    assert "shorter than 9" in poison_reason(_delivery(list(range(8))), model, tail)
    assert poison_reason(_delivery(list(range(9))), model, tail) is None


def test_batches_respect_job_and_padded_token_budgets() -> None:
    deliveries = [_delivery([7] * n) for n in (40, 5, 10, 30, 6, 20)]
    batches = plan_batches(deliveries, LIMITS)
    assert sorted(len(d.job.token_ids) for b in batches for d in b) == [5, 6, 10, 20, 30, 40]
    for batch in batches:
        longest = max(len(d.job.token_ids) for d in batch)
        assert len(batch) <= LIMITS.max_jobs
        assert len(batch) * longest <= LIMITS.max_tokens or len(batch) == 1
    # Similar lengths travel together: the three shortest share one batch.
    assert [len(d.job.token_ids) for d in batches[0]] == [5, 6, 10]


def test_a_claim_computes_one_batch_the_one_holding_the_oldest_job() -> None:
    # 40 tokens waited longest: its batch is computed, the short ones go back, not it again.
    deliveries = [_delivery([7] * n, enqueued_at=t) for n, t in ((5, 20), (6, 30), (40, 10))]
    batch, rest = take_batch(deliveries, LIMITS)
    assert [len(d.job.token_ids) for d in batch] == [40]
    assert sorted(len(d.job.token_ids) for d in rest) == [5, 6]
    # Everything is either computed now or handed back, nothing dropped or duplicated.
    deliveries = [_delivery([7] * n, enqueued_at=n) for n in (40, 5, 10, 30, 6, 20)]
    batch, rest = take_batch(deliveries, LIMITS)
    assert [len(d.job.token_ids) for d in batch] == [5, 6, 10]
    assert sorted(d.stream_id for d in [*batch, *rest]) == sorted(d.stream_id for d in deliveries)
    assert take_batch([], LIMITS) == ([], [])


def test_a_failing_batch_is_split_in_halves_down_to_single_jobs() -> None:
    batch = [_delivery([7] * n) for n in range(1, 6)]
    halves = split_batch(batch)
    assert [len(h) for h in halves] == [2, 3]
    assert [d for h in halves for d in h] == batch
    assert split_batch(batch[:1]) == [batch[:1]]
    # Repeated splitting ends in single jobs after about log2(n) rounds.
    rounds, parts = 0, [batch]
    while any(len(p) > 1 for p in parts):
        parts = [q for p in parts for q in split_batch(p)]
        rounds += 1
    assert rounds == 3 and all(len(p) == 1 for p in parts)


def test_a_failure_reason_names_the_error() -> None:
    reason = failure_reason(RuntimeError("CUDA out of memory"), computing=True)
    assert "RuntimeError" in reason and "out of memory" in reason and "computing" in reason
    reason = failure_reason(ValueError("latents contain NaN or Inf"), computing=False)
    assert "NaN" in reason and "publishing" in reason
