"""The worker's pure decisions: which jobs are poison, how jobs are batched."""

from __future__ import annotations

from cache_store import Delivery, Job
from coprocessor_worker.worker import WorkerLimits, plan_batches, poison_reason


class _Model:
    fingerprint = "c" * 32
    decoder_fingerprint = "d" * 32
    n_latents = 4

    def latents(self, prefixes):
        raise AssertionError


LIMITS = WorkerLimits(max_jobs=3, max_tokens=100, max_prefix_tokens=64, vocab_size=1000)


def _delivery(token_ids: list[int], decoder_fp: str = "d" * 32) -> Delivery:
    job = Job.create(
        tenant="t", decoder_fp=decoder_fp, coprocessor_fp="c" * 32, token_ids=token_ids
    )
    return Delivery(job=job, stream_id="1-0", deliveries=1, consumer="w")


def test_poison_jobs_are_named() -> None:
    model = _Model()
    assert poison_reason(_delivery([1, 2, 3]), model, LIMITS) is None
    assert "decoder" in poison_reason(_delivery([1], decoder_fp="e" * 32), model, LIMITS)
    assert "exceeds" in poison_reason(_delivery(list(range(65))), model, LIMITS)
    assert "vocabulary" in poison_reason(_delivery([5, 1000]), model, LIMITS)


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
